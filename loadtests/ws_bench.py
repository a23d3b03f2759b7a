"""WebSocket message round trip through the stack, against a direct connection.

One lbstack stack (scenario ``websocket``: balancer → 2 proxies → 3 zero-latency
servers each); ``--sockets`` WebSocket clients each send ``--messages`` messages of
``--size`` bytes one after the other and time each echo, over the balancer's socket and,
in alternating rounds, straight to one server's socket, so the difference is what two
tunnelling hops add to a message.

Run it from the project root: ``.venv/bin/python -m loadtests.ws_bench``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from loadtests.loadgen import Histogram, echoes
from loadtests.options import parser, positive_int, run_main, timed
from loadtests.report import Report
from loadtests.scenarios import SCENARIOS, Echo
from loadtests.topology import kept, lbstack_up


async def amain(args: argparse.Namespace) -> int:
    scenario = timed(SCENARIOS["websocket"], args)
    load = Echo(args.sockets, args.messages, args.size)
    report = Report("ws", {**vars(load), "rounds": scenario.rounds})
    totals = {socket: Histogram() for socket in scenario.systems}
    with kept("lbw-", args.keep) as workdir:
        async with lbstack_up(scenario.topology, workdir, report) as lb:
            for socket in scenario.systems:  # warm-up
                await echoes(str(lb.stack.run_dir / socket), 1, 50, load.size)
            for round_ in range(1, scenario.rounds + 1):
                for socket, total in totals.items():
                    times = await echoes(
                        str(lb.stack.run_dir / socket), load.sockets, load.messages, load.size
                    )
                    total.merge(times)
                    report.row("rounds", {"round": round_, "socket": socket, **times.figures()})
    report.table(
        "round trips",
        [{"socket": s, "messages": t.count, **t.figures()} for s, t in totals.items()],
    )
    report.notes.append(
        "balancer.sock: through the balancer and a proxy; server-0-0.sock: straight to a server"
    )
    return report.finish(args.json)


def main(argv: Sequence[str] | None = None) -> None:
    scenario = SCENARIOS["websocket"]
    load = scenario.load
    assert isinstance(load, Echo)
    cli = parser("ws_bench", __doc__, "ws.json", scenario)
    cli.add_argument("--sockets", type=positive_int, default=load.sockets, help="at once")
    cli.add_argument("--messages", type=positive_int, default=load.messages, help="per socket")
    cli.add_argument("--size", type=positive_int, default=load.size, help="message bytes")
    run_main(amain, cli, argv)


if __name__ == "__main__":
    main()
