"""HTTPS at the front: lbstack's balancer terminating TLS against nginx doing the same.

One lbstack stack (scenario ``tls``: balancer → 2 proxies → 3 zero-latency servers
each) with an ``https://`` listener, and nginx in the same shape over the same server
processes with its front terminating TLS (1.2/1.3, the same self-signed P-256
certificate, made here with ``openssl``). wrk loads each over keep-alive HTTPS
connections at ``--connections``, in alternating rounds.

Run it from the project root: ``.venv/bin/python -m loadtests.tls_bench``.
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from loadtests.options import parser, positive_int, run_main, timed
from loadtests.report import Report, find, medians, ratio, say
from loadtests.scenarios import SCENARIOS, Wrk
from loadtests.topology import kept, lbstack_up, missing, other_up, version
from loadtests.wrk import rounds


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, and its key (P-256)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def amain(args: argparse.Namespace) -> int:
    if problem := missing("wrk", "nginx", "openssl"):
        say(problem)
        return 1
    scenario = replace(timed(SCENARIOS["tls"], args), load=Wrk((args.connections,)))
    report = Report("tls", {k: v for k, v in vars(args).items() if k not in ("json", "keep")})
    report.host |= {p: version(p) for p in ("wrk", "nginx")}
    with kept("lbt-", args.keep) as workdir:
        tls = self_signed(workdir)
        async with lbstack_up(scenario.topology, workdir, report, tls=tls) as lb:
            lbstack = await lb.system()
            async with other_up(scenario.systems[1], lb.server_groups(), workdir, tls=tls) as nginx:
                nginx.tiers["servers"] = lbstack.tiers["servers"]
                runs = await rounds([lbstack, nginx], scenario, report, workdir)
    columns = [
        "system",
        "runs",
        "req_per_s",
        "p50_ms",
        "p99_ms",
        "errors",
        "cpu_us_front",
        "cpu_us_total",
    ]
    summary = report.table("medians over the rounds", medians(runs, ("system",)), columns)
    ours, theirs = (find(summary, system=s) for s in scenario.systems)
    report.figures["throughput_ratio"] = ratio(ours.get("req_per_s"), theirs.get("req_per_s"))
    report.figures["p99_ratio"] = ratio(ours.get("p99_ms"), theirs.get("p99_ms"))
    return report.finish(args.json)


def main(argv: Sequence[str] | None = None) -> None:
    cli = parser("tls_bench", __doc__, "tls.json", SCENARIOS["tls"])
    cli.add_argument("--connections", type=positive_int, default=64, help="wrk (64)")
    run_main(amain, cli, argv)


if __name__ == "__main__":
    main()
