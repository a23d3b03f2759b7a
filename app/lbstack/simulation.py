"""The simulated application's behaviour: the work per request and runtime faults.

A ``Simulator`` holds the ``Simulation`` a built-in server runs now. It starts as the
configured one and changes through fault injection (``Simulator.apply``), which can
also hang every request until the fault is cleared. Each request draws its ``Work``
(latency, CPU time, error or not, padding) from the simulation in force when it
arrived. The latency distributions and the CPU burn are plain functions, so they can
be checked on their own.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from pydantic import BaseModel, ConfigDict, ValidationError

from lbstack.config import Simulation
from lbstack.errors import LbstackError

# Each latency distribution, by its config name: (latency, sigma, rng) -> seconds.
LatencySampler = Callable[[float, float, random.Random], float]
LATENCY_DISTRIBUTIONS: dict[str, LatencySampler] = {
    "fixed": lambda latency, sigma, rng: latency,
    "uniform": lambda latency, sigma, rng: rng.uniform(0.0, 2.0 * latency),
    "exponential": lambda latency, sigma, rng: rng.expovariate(1.0 / latency),
    "lognormal": lambda latency, sigma, rng: rng.lognormvariate(math.log(latency), sigma),
}

# The fault actions a POST /fault may carry beside Simulation fields.
FAULT_ACTIONS = ("hang", "crash", "clear")
FAULT_KEYS = (*Simulation.model_fields, *FAULT_ACTIONS)


def sample_latency(simulation: Simulation, rng: random.Random) -> float:
    """One request's added latency in seconds, drawn from the simulation's distribution."""
    if simulation.latency <= 0:
        return 0.0
    sampler = LATENCY_DISTRIBUTIONS[simulation.latency_distribution]
    return sampler(simulation.latency, simulation.latency_sigma, rng)


def burn_cpu(seconds: float) -> float:
    """Keep this thread busy until it has used ``seconds`` of CPU; return the CPU used.

    Thread CPU time, not wall time: the point is load a router can see, and a sleep or
    a preempted process would not produce it.
    """
    if seconds <= 0:
        return 0.0
    start = now = time.thread_time()
    while now - start < seconds:
        sum(range(256))  # some real work between two (system-call) clock reads
        now = time.thread_time()
    return now - start


class Problem(TypedDict):
    """One reason a fault request was refused."""

    field: str
    expected: str
    found: Any


class FaultError(LbstackError):
    """A fault request that cannot be applied; ``problems`` names each bad field."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(
            "invalid fault: "
            + "; ".join(
                f"{p['field']}: expected {p['expected']}, found {p['found']!r}" for p in problems
            )
        )


class _Actions(BaseModel):
    """The action keys of a fault request; pydantic's lax bool takes "true", 1, "yes"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hang: bool | None = None
    crash: bool = False
    clear: bool = False


@dataclass(frozen=True)
class Fault:
    """A validated fault request: the simulation to run next and the actions to take."""

    simulation: Simulation
    hang: bool | None  # None leaves the hang state as it is
    crash: bool
    clear: bool


def parse_fault(data: object, current: Simulation, configured: Simulation) -> Fault:
    """Validate a fault request as a whole; raise FaultError listing every problem.

    Simulation keys are validated by the ``Simulation`` model itself, over the current
    simulation (or the configured one when ``clear`` is asked), so strings such as
    ``"50ms"`` or ``"0.3"`` are accepted wherever the config accepts them.
    """
    if not isinstance(data, Mapping):
        raise FaultError(
            [{"field": "(body)", "expected": "a JSON object", "found": type(data).__name__}]
        )
    problems: list[Problem] = [
        {
            "field": str(key),
            "expected": f"one of {', '.join(FAULT_KEYS)}",
            "found": "an unknown key",
        }
        for key in data
        if key not in FAULT_KEYS
    ]
    actions = _Actions()
    try:
        actions = _Actions.model_validate({k: v for k, v in data.items() if k in FAULT_ACTIONS})
    except ValidationError as exc:
        problems += _problems(exc)
    changes = {k: v for k, v in data.items() if k in Simulation.model_fields}
    base = configured if actions.clear else current
    simulation = base
    try:
        simulation = Simulation.model_validate({**base.model_dump(), **changes})
    except ValidationError as exc:
        problems += _problems(exc)
    if problems:
        raise FaultError(problems)
    return Fault(simulation=simulation, hang=actions.hang, crash=actions.crash, clear=actions.clear)


def _problems(errors: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for error in errors.errors(include_url=False):
        message = error["msg"]
        for prefix in ("Input should be ", "expected "):
            message = message.removeprefix(prefix)
        field = ".".join(str(part) for part in error["loc"]) or "(body)"
        problems.append({"field": field, "expected": message, "found": error.get("input")})
    return problems


@dataclass(frozen=True)
class Work:
    """What one request does, drawn from the simulation in force when it arrived."""

    latency: float  # seconds to wait
    cpu: float  # CPU seconds to burn
    error_status: int | None  # answer with this status instead, or None
    padding: int  # bytes of padding in the answer


class Simulator:
    """The simulation a built-in server runs now, changeable at runtime, and its hang gate."""

    def __init__(self, configured: Simulation, rng: random.Random | None = None) -> None:
        self.configured = configured
        self._current = configured
        self._rng = rng if rng is not None else random.Random()
        self._running = asyncio.Event()  # set unless a hang fault is on
        self._running.set()
        self.held = 0  # requests waiting at the gate of a hang

    @property
    def current(self) -> Simulation:
        return self._current

    @property
    def hanging(self) -> bool:
        return not self._running.is_set()

    def draw(self) -> Work:
        """The work of one request arriving now."""
        simulation = self._current
        failed = self._rng.random() < simulation.error_rate
        return Work(
            latency=sample_latency(simulation, self._rng),
            cpu=simulation.cpu,
            error_status=simulation.error_status if failed else None,
            padding=simulation.response_size,
        )

    async def gate(self) -> None:
        """Return at once, unless a hang is on: then wait until it is lifted."""
        if self._running.is_set():
            return
        self.held += 1
        try:
            await self._running.wait()
        finally:
            self.held -= 1

    def apply(self, data: object) -> Fault:
        """Apply a fault request (see ``parse_fault``): all of it, or nothing.

        Order: ``clear`` (configured simulation, hang lifted), then the simulation
        keys, then ``hang``. ``crash`` is the caller's to carry out.
        """
        fault = parse_fault(data, current=self._current, configured=self.configured)
        self._current = fault.simulation
        if fault.clear:
            self._running.set()
        if fault.hang is True:
            self._running.clear()
        elif fault.hang is False:
            self._running.set()
        return fault

    def snapshot(self) -> dict[str, Any]:
        """The fault state as JSON: current and configured simulation, hang, held requests."""
        return {
            "simulation": self._current.model_dump(mode="json"),
            "configured": self.configured.model_dump(mode="json"),
            "hanging": self.hanging,
            "held": self.held,
        }
