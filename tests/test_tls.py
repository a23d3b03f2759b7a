"""HTTPS at the front (certificates, SNI, reload, expiry metric) and TLS to upstreams.

Real stacks on 127.0.0.1, with a test PKI made by the ``openssl`` command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lbstack import config, tls
from lbstack.address import Address, parse_address
from lbstack.client import fetch
from lbstack.config import TLSConfig, UpstreamTLS
from lbstack.errors import ConfigError
from lbstack.metrics import parse
from lbstack.testing import RunningStack, running_stack
from tests.certs import CA, Pair
from tests.harness import cli, short_tmpdir, until

TOPOLOGY = ("--proxies", "1", "--servers-per-proxy", "1")


@dataclass(frozen=True)
class PKI:
    directory: Path
    ca: CA
    rogue: CA  # a CA nobody here trusts
    a: Pair  # a.test, www.a.test
    b: Pair  # b.test
    a_renewed: Pair  # a.test again, organization "renewed"
    expired: Pair
    wildcard: Pair  # *.w.test, and no SAN but its CN for the CN fallback: see cn_only
    cn_only: Pair
    upstream: Pair  # upstream.test and 127.0.0.1
    rogue_upstream: Pair  # the same names, signed by the rogue CA
    client: Pair


@pytest.fixture(scope="module")
def pki() -> Iterator[PKI]:
    directory = Path(tempfile.mkdtemp(prefix="lbpki", dir="/tmp"))
    ca, rogue = CA(directory, "ca"), CA(directory, "rogue")
    yield PKI(
        directory=directory,
        ca=ca,
        rogue=rogue,
        a=ca.issue("a", "a.test", ["a.test", "www.a.test"]),
        b=ca.issue("b", "b.test", ["b.test"]),
        a_renewed=ca.issue("a2", "a.test", ["a.test", "www.a.test"], organization="renewed"),
        expired=ca.issue("expired", "old.test", ["old.test"], days=-1),
        wildcard=ca.issue("wild", "w.test", ["*.w.test"]),
        cn_only=ca.issue("cn", "cn.test"),
        upstream=ca.issue("up", "upstream.test", ["upstream.test"], ip=["127.0.0.1"]),
        rogue_upstream=rogue.issue(
            "rogue-up", "upstream.test", ["upstream.test"], ip=["127.0.0.1"]
        ),
        client=ca.issue("client", "client.test"),
    )
    shutil.rmtree(directory, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def trusting(ca: CA) -> ssl.SSLContext:
    """A client context that trusts ``ca`` and offers HTTP/2 and HTTP/1.1 (ALPN)."""
    context = ssl.create_default_context(cafile=str(ca.pem))
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def certificate_table(*pairs: Pair) -> str:
    return "".join(f'[[tls.certificates]]\ncert = "{p.cert}"\nkey = "{p.key}"\n' for p in pairs)


class Connection:
    """One keep-alive HTTPS connection, requests written and answers read by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, name: str | None, context: ssl.SSLContext) -> Connection:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=name
        )
        return cls(reader, writer)

    @property
    def peer(self) -> dict[str, Any]:
        """The server's certificate, decoded."""
        return dict(self.writer.get_extra_info("peercert"))

    @property
    def alpn(self) -> str | None:
        ssl_object = self.writer.get_extra_info("ssl_object")
        return None if ssl_object is None else ssl_object.selected_alpn_protocol()

    async def get(self, path: str, host: str = "a.test") -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.strip().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        body = await self.reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


async def peer_of(port: int, name: str | None, context: ssl.SSLContext) -> dict[str, Any]:
    """The certificate the listener on ``port`` shows a client asking for ``name``."""
    connection = await Connection.open(port, name, context)
    try:
        return connection.peer
    finally:
        await connection.close()


def common_name(cert: dict[str, Any]) -> str:
    return str(next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName"))


def organization(cert: dict[str, Any]) -> str | None:
    return next((v for rdn in cert["subject"] for k, v in rdn if k == "organizationName"), None)


async def curl(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def config_file(stack: RunningStack) -> Path:
    return stack.run_dir.parent / "lbstack.toml"


async def balancer_pid(stack: RunningStack) -> int:
    pid = (await stack.component("balancer-0")).pid
    assert pid is not None
    return pid


# ---- HTTPS at the front ----------------------------------------------------------------


async def test_an_https_listener_serves_each_name_its_certificate(pki: PKI) -> None:
    port = free_port()
    toml = f'listen = ["https://127.0.0.1:{port}"]\n' + certificate_table(pki.a, pki.b)
    async with running_stack(*TOPOLOGY, config=toml) as stack:
        assert f"https://127.0.0.1:{port}" in stack.banner

        # curl, verifying against the CA, by name.
        code, out, err = await curl(
            "--cacert", str(pki.ca.pem), "--resolve", f"b.test:{port}:127.0.0.1",
            f"https://b.test:{port}/hello?x=1",
        )  # fmt: skip
        assert code == 0, err
        echo = json.loads(out)
        assert echo["path"] == "/hello" and echo["headers"]["X-Forwarded-Proto"] == "https"
        code, out, err = await curl("-k", f"https://127.0.0.1:{port}/insecure")
        assert code == 0 and json.loads(out)["path"] == "/insecure", err

        # aiohttp, keep-alive: every request of the session on one TLS connection.
        connector = aiohttp.TCPConnector(ssl=trusting(pki.ca), limit=1)
        async with aiohttp.ClientSession(connector=connector) as client:
            for n in range(3):
                async with client.get(
                    f"https://127.0.0.1:{port}/n/{n}", server_hostname="a.test"
                ) as response:
                    assert response.status == 200, await response.text()
                    echo = await response.json()
                    assert echo["headers"]["X-Forwarded-Proto"] == "https"
                    assert response.headers["X-Served-By"] == "server-0-0"

        # SNI: each name its certificate; no name or an unknown one, the first.
        context = trusting(pki.ca)
        assert common_name(await peer_of(port, "a.test", context)) == "a.test"
        assert common_name(await peer_of(port, "www.a.test", context)) == "a.test"
        assert common_name(await peer_of(port, "b.test", context)) == "b.test"
        lax = trusting(pki.ca)
        lax.check_hostname = False
        assert common_name(await peer_of(port, "unknown.test", lax)) == "a.test"
        assert common_name(await peer_of(port, None, lax)) == "a.test"
        connection = await Connection.open(port, "b.test", context)
        assert connection.alpn == "http/1.1"  # never h2: we speak HTTP/1.1
        await connection.close()

        # A plain HTTP client on the https port gets no answer in clear text.
        code, _, _ = await curl(f"http://127.0.0.1:{port}/")
        assert code != 0

        # The expiry of each certificate, as a gauge on the balancer.
        samples = [
            (labels, value)
            for name, labels, value in parse(await stack.admin("balancer-0").metrics())
            if name == "lbstack_tls_certificate_expiry_timestamp_seconds"
        ]
        assert {labels["certificate"]: value for labels, value in samples} == {
            str(pki.a.cert): pki.a.not_after(),
            str(pki.b.cert): pki.b.not_after(),
        }
        assert {(labels["role"], labels["instance"]) for labels, _ in samples} == {
            ("balancer", "balancer-0")
        }
        view = await stack.admin("balancer-0").request("GET", "/tls")
        assert [c["names"] for c in view["certificates"]] == [["a.test", "www.a.test"], ["b.test"]]


async def test_a_reload_serves_new_certificates_and_keeps_established_connections(
    pki: PKI,
) -> None:
    live = short_tmpdir()
    cert, key = live / "site.pem", live / "site.key"
    pki.a.copy_to(cert, key)
    port = free_port()
    toml = f'listen = ["https://127.0.0.1:{port}"]\n[tls]\ncert = "{cert}"\nkey = "{key}"\n'
    context = trusting(pki.ca)
    try:
        async with running_stack(*TOPOLOGY, config=toml) as stack:
            pid = await balancer_pid(stack)
            kept = await Connection.open(port, "a.test", context)
            status, _, _ = await kept.get("/before")
            assert status == 200 and organization(kept.peer) is None

            pki.a_renewed.copy_to(cert, key)  # renewed in place, as certbot does
            out = await cli("reload", "--run-dir", str(stack.run_dir))
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["certificates"] == ["balancer-0"]

            # The established connection goes on, with the session it had.
            status, _, body = await kept.get("/after")
            assert status == 200 and json.loads(body)["path"] == "/after"
            assert organization(kept.peer) is None
            # A new one gets the new certificate; nothing was restarted.
            assert organization(await peer_of(port, "a.test", context)) == "renewed"
            assert await balancer_pid(stack) == pid

            # Bad certificates are refused: the stack keeps serving the renewed one.
            for bad_cert, bad_key, field in (
                (pki.expired.cert, pki.expired.key, "tls.cert"),
                (pki.a_renewed.cert, pki.b.key, "tls.key"),
            ):
                shutil.copyfile(bad_cert, cert)
                shutil.copyfile(bad_key, key)
                out = await cli("reload", "--run-dir", str(stack.run_dir))
                assert out.returncode == 2, out.stderr
                assert f"{field}: expected" in out.stderr, out.stderr
                assert organization(await peer_of(port, "a.test", context)) == "renewed"
            config_file(stack).write_text(toml.replace(str(cert), str(live / "gone.pem")))
            out = await cli("reload", "--run-dir", str(stack.run_dir))
            assert out.returncode == 2 and "tls.cert: expected a PEM certificate file" in (
                out.stderr
            ), out.stderr

            status, _, _ = await kept.get("/still")
            assert status == 200
            assert organization(await peer_of(port, "a.test", context)) == "renewed"
            assert await balancer_pid(stack) == pid
            await kept.close()
            assert "certificates not reloaded" not in stack.logs()  # refused before
    finally:
        shutil.rmtree(live, ignore_errors=True)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no certificate", "tls: expected cert and key (or [[tls.certificates]]) for the https"),
        ("missing key file", "tls.key: expected a PEM private key file, found no such file"),
        ("mismatched key", "tls.certificates.1.key: expected the unencrypted PEM private key"),
        ("expired", "tls.certificates.0.cert: expected a certificate valid now, found one that"),
        ("cert without key", "tls: key: expected a key with the cert, found only the cert"),
        ("missing CA file", "proxy.upstream_tls.ca_file: expected a PEM file of CA"),
    ],
)
async def test_a_bad_certificate_stops_the_start(pki: PKI, case: str, expected: str) -> None:
    listen = 'listen = ["https://127.0.0.1:1"]\n'
    toml = {
        "no certificate": listen,
        "missing key file": listen + f'[tls]\ncert = "{pki.a.cert}"\nkey = "/nonexistent.key"\n',
        "mismatched key": listen + certificate_table(pki.a, Pair(pki.b.cert, pki.a.key)),
        "expired": listen + certificate_table(pki.expired, pki.a),
        "cert without key": listen + f'[tls]\ncert = "{pki.a.cert}"\n',
        "missing CA file": '[proxy.upstream_tls]\nca_file = "/nonexistent.pem"\n',
    }[case]
    base = short_tmpdir()
    try:
        (base / "lbstack.toml").write_text(toml)
        out = await cli("up", "--config", str(base / "lbstack.toml"), "--run-dir", f"{base}/run")
        assert out.returncode == 2, out.stderr
        assert expected in out.stderr, out.stderr
        assert not (base / "run").exists()  # nothing started
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- TLS to upstreams -----------------------------------------------------------------


@dataclass
class TLSServer:
    address: Address
    seen: list[tuple[str, str | None]]  # (path, client certificate's CN) of each request


@contextlib.asynccontextmanager
async def tls_server(pair: Pair, client_ca: CA | None = None) -> AsyncIterator[TLSServer]:
    """An aiohttp server over TLS on 127.0.0.1 with ``pair``; with ``client_ca``, only
    for clients with a certificate it signed (mTLS). Answers who the client was."""
    seen: list[tuple[str, str | None]] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca.pem))

    async def answer(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        client = common_name(peer) if peer else None
        seen.append((request.path, client))
        return web.json_response({"client": client})

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        await web.SockSite(runner, sock, ssl_context=context).start()
        yield TLSServer(parse_address(f"https://127.0.0.1:{sock.getsockname()[1]}"), seen)
    finally:
        await runner.cleanup()
        sock.close()


def address_groups(*servers: TLSServer) -> str:
    return "".join(
        f'[[groups]]\n[groups.server]\nkind = "address"\naddresses = ["{s.address}"]\n'
        'health_path = "/healthz"\n'
        for s in servers
    )


async def through_proxy(stack: RunningStack, proxy: str) -> tuple[int, bytes]:
    """GET / on ``proxy``'s data socket."""
    return await fetch(Address.unix(str(stack.run_dir / f"{proxy}.sock")), "/")


async def test_proxies_reach_https_servers_with_tls_and_mtls(pki: PKI) -> None:
    upstream_tls = (
        f'[proxy.upstream_tls]\nca_file = "{pki.ca.pem}"\nserver_name = "upstream.test"\n'
        f'cert = "{pki.client.cert}"\nkey = "{pki.client.key}"\n'
    )
    async with (
        tls_server(pki.upstream) as plain,
        tls_server(pki.upstream, client_ca=pki.ca) as mutual,
        running_stack(config=upstream_tls + address_groups(plain, mutual)) as stack,
    ):
        status, body = await through_proxy(stack, "proxy-0")
        assert status == 200, body
        assert json.loads(body)["client"] is None  # TLS: no client certificate asked for
        status, body = await through_proxy(stack, "proxy-1")
        assert status == 200, body
        assert json.loads(body)["client"] == "client.test"  # required: mTLS

        async def checked() -> bool:
            return ("/healthz", None) in plain.seen and ("/healthz", "client.test") in mutual.seen

        await until(checked, "a health check of each server, over TLS")
        for proxy, server in (("proxy-0", "server-0-0"), ("proxy-1", "server-1-0")):
            view = await stack.admin(proxy).upstream(server)
            assert view.healthy is True, view
        async with stack.session() as client:
            for _ in range(6):
                async with client.get("/") as response:
                    assert response.status == 200, await response.text()


async def test_a_wrong_ca_or_a_missing_client_certificate_is_a_502(pki: PKI) -> None:
    upstream_tls = f'[proxy.upstream_tls]\nca_file = "{pki.ca.pem}"\n'  # no client cert
    async with (
        tls_server(pki.rogue_upstream) as rogue,
        tls_server(pki.upstream, client_ca=pki.ca) as mutual,
        running_stack(config=upstream_tls + address_groups(rogue, mutual)) as stack,
    ):
        for proxy in ("proxy-0", "proxy-1"):
            status, body = await through_proxy(stack, proxy)
            assert status == 502, (proxy, status, body)
        # A certificate the CA did not sign is said as such.
        _, body = await through_proxy(stack, "proxy-0")
        assert b"TLS to the upstream failed" in body, body
        assert not rogue.seen and not mutual.seen  # no request got through

        async def unhealthy() -> bool:  # the health checks fail the same way
            views = [
                await stack.admin(proxy).upstream(server)
                for proxy, server in (("proxy-0", "server-0-0"), ("proxy-1", "server-1-0"))
            ]
            return not any(view.healthy for view in views)

        await until(unhealthy, "both servers out after failed checks")


# ---- the parts, in process -------------------------------------------------------------


def test_the_certificate_reader_below_the_ssl_api_still_works(pki: PKI) -> None:
    """Pins ``_ssl._test_decode_cert``, the one use below the ssl module's public API."""
    decoded = tls._decode_certificate(str(pki.a.cert))
    assert ssl.cert_time_to_seconds(decoded["notAfter"]) == pki.a.not_after()
    assert ("DNS", "www.a.test") in decoded["subjectAltName"]


def test_names_come_from_the_san_else_the_cn_and_wildcards_match_one_label(pki: PKI) -> None:
    settings = TLSConfig.model_validate(
        {
            "certificates": [
                {"cert": p.cert, "key": p.key} for p in (pki.a, pki.wildcard, pki.cn_only)
            ]
        }
    )
    store = tls.CertificateStore(settings)
    assert [c.names for c in store.certificates] == [
        ("a.test", "www.a.test"),
        ("*.w.test",),
        ("cn.test",),
    ]
    a, wildcard, cn = (c.context for c in store.certificates)
    assert store.context_for("x.w.test") is wildcard
    assert store.context_for("X.W.Test.") is wildcard
    assert store.context_for("y.x.w.test") is a  # one label only: the default
    assert store.context_for("cn.test") is cn
    assert store.context_for(None) is a


def test_a_certificate_not_yet_valid_is_refused(pki: PKI) -> None:
    settings = config.validate({"tls": {"cert": pki.a.cert, "key": pki.a.key}})
    assert tls.problems(settings) == []
    long_ago = time.time() - 365 * 86400
    [problem] = tls.problems(settings, now=long_ago)
    assert problem.startswith("tls.cert: expected a certificate valid now, found one not valid")


def test_tls_settings_are_checked_in_the_model() -> None:
    assert TLSConfig.model_validate({"min_version": 1.3}).min_version == "1.3"
    with pytest.raises(ConfigError, match=r"tls.min_version: expected"):
        config.validate({"tls": {"min_version": "1.1"}})
    with pytest.raises(ConfigError, match=r"tls.ciphers: expected an OpenSSL cipher list"):
        config.validate({"tls": {"ciphers": "NOTHING-LIKE-THIS"}})
    with pytest.raises(ConfigError, match=r"balancer.upstream_tls: cert: expected a cert"):
        config.validate({"balancer": {"upstream_tls": {"key": "/k.pem"}}})
    assert parse_address("https://[::1]:8443") == Address("https", host="::1", port=8443)
    assert str(parse_address("https://h:1")) == "https://h:1"


def test_verify_false_is_a_loud_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        context = tls.client_context(UpstreamTLS(verify=False))
    assert context.verify_mode == ssl.CERT_NONE
    assert "NOT authenticated" in caplog.text
    assert tls.upstream_context(UpstreamTLS(), parse_address("tcp://h:1")) is None
