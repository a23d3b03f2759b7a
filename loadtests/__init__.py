"""Benchmarks of lbstack: programs that print figures, never tests that assert timings.

``topology`` starts the stacks to compare (lbstack, and nginx over the same servers),
``wrk`` drives load with wrk, ``procstats`` reads CPU time and memory from /proc,
``keepalive_clients`` holds many keep-alive client connections open;
``loadgen`` is the aiohttp load generator (open loop: Poisson arrivals, latency from
each request's scheduled start; closed loop: N at a time);
``openloop`` judges routing under open-loop load against nginx and HAProxy
(``python -m loadtests.openloop``), ``routing_bench`` is the closed-loop routing and
failover benchmark (``python -m loadtests.routing_bench``), ``floor`` one hop against a
plain aiohttp forwarder (``python -m loadtests.floor``), and ``bench`` the forwarding
cost against nginx (``python -m loadtests.bench``).
"""
