"""The data plane: the HTTP forwarding core the balancer and the proxies share.

Read it in this order:

* ``front``: the client side, our protocol on aiohttp's C request parser;
* ``forwarder``: one hop wired from the pieces below, and its views;
* ``exchange``: one request, a retry loop over single tries, each an ``Outcome``;
* ``relay``: the bodies, up and down, within flow control; ``state``: what one
  request in flight shares with the timeout sweep;
* ``admission``: which upstream takes it, within in-flight caps and a queue;
* ``upstreams``: the upstream set, each one's pool, and runtime changes;
* ``headers``: request and response heads, pure functions on bytes;
* ``stats``: plain per-request counters, turned into metrics at scrape time;
* ``lbstack.aio`` (beside this package): every use of aiohttp below its public API,
  each pinned by a test.
"""

from lbstack.forwarding.forwarder import FORWARDER, Forwarder
from lbstack.forwarding.upstreams import UnknownUpstream, UpstreamConflict, new_upstream

__all__ = ["FORWARDER", "Forwarder", "UnknownUpstream", "UpstreamConflict", "new_upstream"]
