"""The runtime view of one upstream that routing policies choose from."""

from __future__ import annotations

from dataclasses import dataclass

from app.address import Address


@dataclass(eq=False, slots=True)
class Upstream:
    """One upstream as a router sees it: where it is and how loaded it is right now.

    The forwarder keeps ``in_flight``, ``requests`` and ``errors`` exact per request;
    health checks and ejection flip ``available``. Identity is the object itself, so a
    policy's ``exclude`` set is cheap to test.
    """

    name: str
    address: Address
    admin: Address | None = None
    available: bool = True
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
