"""Benchmarks of lbstack: programs that print figures and write JSON, never timed tests.

What runs is data in ``scenarios`` (topologies, load shapes, faults, and the targets);
``topology`` starts the systems compared (lbstack through ``lbstack.testing``, nginx and
HAProxy in its shape over the same servers); the load comes from ``wrk`` (closed loop,
alternating rounds with CPU per tier) or ``loadgen`` (the aiohttp generator: open and
closed loop, held connections, WebSocket echoes); ``report`` prints the tables and each
target's PASS or MISS and writes the JSON. One program per benchmark: ``bench``,
``openloop``, ``floor``, ``routing_bench``, ``autoscale_bench``, ``change_bench``,
``ws_bench``, ``tls_bench`` (``python -m loadtests.<name>``); ``locustfile`` drives a
running stack with Locust.
"""
