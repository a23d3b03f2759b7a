"""HTTPS at the front: lbstack's balancer terminating TLS against nginx doing the same.

One lbstack stack (balancer → 2 proxies → 3 zero-latency servers each) with an
``https://`` listener, and nginx in the same shape over the same server processes with
its front terminating TLS (1.2/1.3, the same self-signed certificate, made here with
``openssl``). wrk loads each over keep-alive HTTPS connections at ``--connections``, in
alternating rounds; prints requests per second and p50/p99 for each, and the ratio.

Run it from the project root: ``.venv/bin/python -m loadtests.tls_bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from loadtests.bench import stack_config
from loadtests.options import positive_int, run_main
from loadtests.topology import LbstackStack, NginxTopology, make_workdir, remove_workdir
from loadtests.wrk import find_wrk, run_wrk

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "tls.json"
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


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


async def amain(options: argparse.Namespace) -> int:
    wrk = find_wrk()
    if wrk is None:
        console.print("error: wrk is required (apt-get install wrk)", markup=False)
        return 1
    workdir = make_workdir("lbt-")
    rates: dict[str, list[float]] = {"lbstack": [], "nginx": []}
    p99: dict[str, list[float]] = {"lbstack": [], "nginx": []}
    try:
        cert, key = self_signed(workdir)
        config = (
            stack_config(proxies=2, servers_per_proxy=3, latency="0ms")
            + f'\n[tls]\ncert = "{cert}"\nkey = "{key}"\n'
        )
        async with (
            LbstackStack(workdir, config, https=True) as stack,
            NginxTopology(
                workdir, stack.server_groups(), method="least_conn", tls=(cert, key)
            ) as nginx,
        ):
            urls = {"lbstack": stack.url, "nginx": nginx.url}
            for url in urls.values():  # warm-up
                await run_wrk(url, workdir=workdir, duration=2, connections=8, wrk=wrk)
            for round_ in range(1, options.rounds + 1):
                for system, url in urls.items():
                    result = await run_wrk(
                        url,
                        workdir=workdir,
                        duration=options.duration,
                        connections=options.connections,
                        wrk=wrk,
                    )
                    rates[system].append(result.requests_per_s)
                    p99[system].append(result.latency.p99_us / 1e3)
                    console.print(
                        f"round {round_} {system:<8} {result.requests_per_s:8.0f} req/s  "
                        f"p99 {result.latency.p99_us / 1e3:7.2f} ms  "
                        f"{result.non_2xx + result.socket_errors} errors",
                        markup=False,
                    )
    finally:
        remove_workdir(workdir)
    ours, theirs = statistics.median(rates["lbstack"]), statistics.median(rates["nginx"])
    console.print(
        f"HTTPS c={options.connections}: lbstack {ours:.0f} req/s, nginx {theirs:.0f} req/s: "
        f"{ours / theirs:.2f}× nginx (p99 {statistics.median(p99['lbstack']):.2f} ms against "
        f"{statistics.median(p99['nginx']):.2f} ms)",
        markup=False,
    )
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(
        json.dumps({"benchmark": "tls", "requests_per_s": rates, "p99_ms": p99}, indent=2) + "\n"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.tls_bench", description=__doc__)
    parser.add_argument("--connections", type=positive_int, default=64, help="wrk (64)")
    parser.add_argument("--duration", type=positive_int, default=10, help="s per run (10)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="rounds (2)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results JSON")
    run_main(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
