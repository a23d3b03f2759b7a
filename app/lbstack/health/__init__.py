"""Which upstreams may take traffic: active health checks, passive ejection, panic mode.

A ``HealthMonitor`` owns the routing gate of a router's upstreams (``Upstream.available``
and the fields behind it). Three inputs decide it:

* **active checks**: every ``tier.health.interval`` each upstream is probed (``GET
  /readyz`` on its admin socket, else its ``health_path`` on the data socket), with
  rise/fall hysteresis on ``Upstream.healthy``. Live traffic is evidence too: a healthy
  upstream whose requests all succeeded since its last check is not probed again until
  ``tier.health.traffic_interval`` has passed, so a busy router with many upstreams
  doesn't pay a fresh connection per upstream per interval to learn what its requests
  already told it. Idle, failing, ejected and unhealthy upstreams are probed every
  interval;
* **passive ejection**: the forwarder reports every try with ``success``/``failure``;
  ``tier.ejection.consecutive_failures`` failures in a row eject the upstream for an
  exponentially growing time, after which it comes back with slow start;
* **panic mode**: when fewer than ``tier.ejection.panic_threshold`` of the upstreams
  would be in, health is ignored and every upstream that isn't draining takes traffic
  (Envoy's panic threshold), since a struggling upstream beats none at all.

``HealthMonitor`` (``monitor``) decides from the three; its ``ActiveChecks``
(``checks``) runs the probes. The decision logic (``record_check``, ``success``,
``failure``, ``refresh``) is synchronous and reads time only from the injected clock,
so it can be driven without real time; ``start`` adds the background check loops and
the re-admission timer.

Upstreams come and go at runtime (``add``, ``remove``): each has its own check loop,
session and metric series, started and stopped with it.
"""

from lbstack.health.checks import ActiveChecks
from lbstack.health.monitor import HealthMonitor

__all__ = ["ActiveChecks", "HealthMonitor"]
