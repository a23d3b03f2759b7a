"""Benchmarks of lbstack: programs that print figures, never tests that assert timings.

``topology`` starts the stacks to compare (lbstack, and nginx over the same servers),
``wrk`` drives load with wrk, ``routing_bench`` is the routing/failover benchmark
(``python -m loadtests.routing_bench``).
"""
