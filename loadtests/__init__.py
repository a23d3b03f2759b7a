"""Benchmarks of lbstack: programs that print figures, never tests that assert timings.

``topology`` starts the stacks to compare (lbstack, and nginx over the same servers),
``wrk`` drives load with wrk, ``procstats`` reads CPU time and memory from /proc,
``keepalive_clients`` holds many keep-alive client connections open;
``routing_bench`` is the routing/failover benchmark (``python -m loadtests.routing_bench``)
and ``bench`` the forwarding-cost benchmark against nginx (``python -m loadtests.bench``).
"""
