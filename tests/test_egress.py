"""The egress guard (security.md PX-4/PX-5, §2.1): real local servers on 127.0.0.1, real httpx
clients; the only thing swapped is the resolver function, injected through the constructor."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from infrastructure.egress import (
    ENV_VAR,
    EgressConfigError,
    EgressDenied,
    EgressPolicy,
    address_problem,
    guarded_async_client,
    guarded_client,
    odd_ipv4_literal,
)
from infrastructure.upstream_http import GuardedUpstream

# --------------------------------------------------------------------------------------------------
# A recording HTTP(S) server on 127.0.0.1
# --------------------------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str  # request target as sent: origin-form normally, absolute-form through a proxy
    host: str


@dataclass
class LocalServer:
    port: int
    seen: list[Seen] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def local_server(tls: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    state = LocalServer(port=0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            state.seen.append(Seen(self.command, self.path, self.headers.get("Host", "")))
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b"direct"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = _answer
        do_POST = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        tls.sni_callback = lambda sock, name, ctx: state.sni.append(name)  # type: ignore[assignment]
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with local_server() as s:
        yield s


class ScriptedResolver:
    """A real resolver function with scripted answers (one list per call; the last one repeats)."""

    def __init__(self, *answers: Sequence[str], names: Sequence[str] | None = None) -> None:
        self.answers = [list(a) for a in answers]
        self.names = set(names) if names is not None else None
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if self.names is not None and host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        index = min(len(self.calls), len(self.answers)) - 1
        return self.answers[index]


def get(policy: EgressPolicy, url: str, **kw: object) -> httpx.Response:
    resolver = kw.pop("resolver", None)
    with guarded_client(policy, timeout=5, resolver=resolver) as client:  # type: ignore[arg-type]
        return client.get(url, **kw)  # type: ignore[arg-type]


def aget(policy: EgressPolicy, url: str, **kw: object) -> httpx.Response:
    resolver = kw.pop("resolver", None)

    async def main() -> httpx.Response:
        async with guarded_async_client(policy, timeout=5, resolver=resolver) as client:  # type: ignore[arg-type]
            return await client.get(url, **kw)  # type: ignore[arg-type]

    return asyncio.run(main())


def upstream_get(policy: EgressPolicy, url: str, **kw: object) -> httpx.Response:
    """The request proxy's own client (``GuardedUpstream``) under the same checks."""
    resolver = kw.pop("resolver", None)
    kw.pop("follow_redirects", None)  # it never follows them

    async def main() -> httpx.Response:
        client = GuardedUpstream(policy, httpx.Timeout(5.0), resolver=resolver)  # type: ignore[arg-type]
        try:
            response = await client.send("GET", httpx.URL(url), {}, None)
            body = await response.aread()
            await response.aclose()
            return httpx.Response(response.status_code, headers=list(response.headers.items()), content=body)
        finally:
            await client.aclose()

    return asyncio.run(main())


BOTH = pytest.mark.parametrize("fetch", [get, aget, upstream_get], ids=["sync", "async", "proxy"])
NOBODY = EgressPolicy()
LOOPBACK_ONLY = EgressPolicy(["127.0.0.1"])


# --------------------------------------------------------------------------------------------------
# The address table
# --------------------------------------------------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("100.64.0.1", "CGNAT"),
    ("100.100.100.200", "CGNAT"),  # Alibaba Cloud metadata
    ("fc00::1", "unique local"),
    ("fd00:ec2::254", "unique local"),  # AWS IPv6 metadata
    ("224.0.0.251", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this-network"),
    ("::", "unspecified"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.10", "non-global"),  # documentation range
    ("::ffff:127.0.0.1", "IPv4-mapped form of a loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped form of a private"),
    ("::ffff:169.254.169.254", "IPv4-mapped form of a link-local"),
    ("::127.0.0.1", "IPv4-compatible form of a loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64 form of a link-local"),
    ("2002:7f00:1::1", "6to4 form of a loopback"),
    ("fec0::1", "site-local"),
]


@pytest.mark.parametrize(("address", "category"), REFUSED, ids=[a for a, _ in REFUSED])
def test_every_non_public_category_is_refused(address: str, category: str) -> None:
    problem = address_problem(ipaddress.ip_address(address))
    assert problem is not None and category in problem
    with pytest.raises(EgressDenied) as info:
        NOBODY.literal_addresses(address)
    assert category in info.value.reason
    with pytest.raises(EgressDenied):
        NOBODY.check_resolved("name.test", [address])


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None
    assert NOBODY.literal_addresses(address) is not None


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/",
        "http://[fd00::1]/",
        "http://100.64.1.1/",
        "http://0.0.0.0:80/",
        "https://192.168.0.1/",
    ],
)
@BOTH
def test_client_refuses_literals_before_connecting(fetch: Callable[..., httpx.Response], url: str) -> None:
    with pytest.raises(EgressDenied):
        fetch(NOBODY, url)


@BOTH
def test_allowlisted_address_is_reachable_and_others_still_refused(
    fetch: Callable[..., httpx.Response], server: LocalServer
) -> None:
    with pytest.raises(EgressDenied, match="loopback"):
        fetch(NOBODY, server.url + "/")
    assert fetch(LOOPBACK_ONLY, server.url + "/").text == "direct"
    assert server.seen[-1].host == f"127.0.0.1:{server.port}"
    with pytest.raises(EgressDenied, match="private"):
        fetch(LOOPBACK_ONLY, "http://10.0.0.1/")


@BOTH
def test_allowlisted_cidr(fetch: Callable[..., httpx.Response], server: LocalServer) -> None:
    assert fetch(EgressPolicy(["127.0.0.0/8"]), server.url + "/").status_code == 200
    with pytest.raises(EgressDenied):
        fetch(EgressPolicy(["10.0.0.0/8", "127.0.0.2/32"]), server.url + "/")


@BOTH
def test_host_name_allow_entry(fetch: Callable[..., httpx.Response], server: LocalServer) -> None:
    """``localhost`` through the system resolver: refused by address, accepted when named."""
    url = f"http://localhost:{server.port}/"
    with pytest.raises(EgressDenied, match=r"resolves to (127\.0\.0\.1|::1) \(loopback address\)"):
        fetch(NOBODY, url)
    assert fetch(EgressPolicy(["localhost"]), url).text == "direct"
    assert server.seen[-1].host == f"localhost:{server.port}"


@BOTH
def test_wildcard_host_entry_matches_subdomains_only(fetch: Callable[..., httpx.Response], server: LocalServer) -> None:
    resolver = ScriptedResolver(["127.0.0.1"])
    policy = EgressPolicy.parse("*.corp.test")
    assert fetch(policy, f"http://files.corp.test:{server.port}/", resolver=resolver).status_code == 200
    with pytest.raises(EgressDenied):
        fetch(policy, f"http://corp.test:{server.port}/", resolver=resolver)
    with pytest.raises(EgressDenied):
        fetch(policy, f"http://evilcorp.test:{server.port}/", resolver=resolver)


def test_allow_parsing() -> None:
    policy = EgressPolicy.parse(" 127.0.0.1 , 10.1.0.0/16,,[::1], Intranet.Example. , *.corp.test")
    assert policy.allows_address(ipaddress.ip_address("127.0.0.1"))
    assert policy.allows_address(ipaddress.ip_address("10.1.200.3"))
    assert not policy.allows_address(ipaddress.ip_address("10.2.0.1"))
    assert policy.allows_address(ipaddress.ip_address("::1"))
    assert policy.allows_address(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert policy.allows_name("intranet.example") and policy.allows_name("INTRANET.example.")
    assert policy.allows_name("a.b.corp.test") and not policy.allows_name("corp.test")
    assert EgressPolicy.from_env({ENV_VAR: "127.0.0.1"}).allows_address(ipaddress.ip_address("127.0.0.1"))
    assert not EgressPolicy.from_env({}).allows_address(ipaddress.ip_address("127.0.0.1"))
    for bad in ["2130706433", "0x7f.1", "http://x", "a b", "-bad.example", "x/y/z"]:
        with pytest.raises(EgressConfigError):
            EgressPolicy([bad])


# --------------------------------------------------------------------------------------------------
# Odd literals and IPv4-mapped IPv6
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "means"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.000.000.001", "127.0.0.1"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("0x08.0x08.0x08.0x08", "8.8.8.8"),  # public, but no legitimate URL is written like this
    ],
)
def test_odd_ipv4_literals_are_refused(host: str, means: str) -> None:
    assert str(odd_ipv4_literal(host)) == means
    with pytest.raises(EgressDenied, match="non-canonical IPv4 literal"):
        NOBODY.literal_addresses(host)


def test_canonical_literals_and_names_are_not_odd() -> None:
    for host in ["127.0.0.1", "8.8.8.8", "example.com", "cafe.be", "0x.example", "deadbeef.example"]:
        assert odd_ipv4_literal(host) is None


@BOTH
def test_odd_literals_never_reach_the_resolver_or_the_server(
    fetch: Callable[..., httpx.Response], server: LocalServer
) -> None:
    resolver = ScriptedResolver(["127.0.0.1"])
    for host in ["2130706433", "0x7f.1", "017700000001"]:
        with pytest.raises(EgressDenied, match="non-canonical"):
            fetch(NOBODY, f"http://{host}:{server.port}/", resolver=resolver)
    assert resolver.calls == [] and server.seen == []
    # "unless allowed": the address it denotes is allow-listed → connect to that checked address
    assert fetch(LOOPBACK_ONLY, f"http://2130706433:{server.port}/", resolver=resolver).text == "direct"
    assert resolver.calls == []


@BOTH
def test_ipv4_mapped_ipv6_loopback(fetch: Callable[..., httpx.Response], server: LocalServer) -> None:
    url = f"http://[::ffff:127.0.0.1]:{server.port}/"
    with pytest.raises(EgressDenied, match="IPv4-mapped form of a loopback"):
        fetch(NOBODY, url)
    # allow-listed via its IPv4 form; connected over IPv4 to the server that listens on 127.0.0.1
    assert fetch(LOOPBACK_ONLY, url).text == "direct"


# --------------------------------------------------------------------------------------------------
# Resolution: every address checked, one resolution per connection (DNS rebinding)
# --------------------------------------------------------------------------------------------------


@BOTH
def test_name_resolving_to_private_address_is_refused(fetch: Callable[..., httpx.Response]) -> None:
    resolver = ScriptedResolver(["10.1.2.3"])
    with pytest.raises(EgressDenied, match=r"resolves to 10\.1\.2\.3 \(private address"):
        fetch(NOBODY, "http://internal.test/", resolver=resolver)
    assert resolver.calls == ["internal.test"]


@BOTH
def test_every_resolved_address_is_checked(fetch: Callable[..., httpx.Response]) -> None:
    """A public answer next to a metadata address does not make the name acceptable."""
    resolver = ScriptedResolver(["93.184.216.34", "169.254.169.254"])
    with pytest.raises(EgressDenied, match="metadata"):
        fetch(NOBODY, "http://mixed.test/", resolver=resolver)


@BOTH
def test_rebinding_cannot_slip_between_check_and_connect(
    fetch: Callable[..., httpx.Response], server: LocalServer
) -> None:
    """The resolver answers differently on each call. The guard asks once per connection and
    connects to the very address it checked: ``rebind.test`` exists in no DNS, so reaching the
    server proves the connect used the checked answer and did not resolve the name again."""
    rebinding = ScriptedResolver(["127.0.0.1"], ["169.254.169.254"])
    url = f"http://rebind.test:{server.port}/first"
    assert fetch(LOOPBACK_ONLY, url, resolver=rebinding).text == "direct"
    assert rebinding.calls == ["rebind.test"]
    assert server.seen[-1].host == f"rebind.test:{server.port}"  # Host header kept
    # the next connection resolves again, gets the rebound answer, and is refused before connecting
    with pytest.raises(EgressDenied, match=r"169\.254\.169\.254"):
        fetch(LOOPBACK_ONLY, url, resolver=rebinding)
    assert len(rebinding.calls) == 2 and len(server.seen) == 1

    # and the other way round: refused on the first answer, no second look that could say "fine"
    reverse = ScriptedResolver(["169.254.169.254"], ["127.0.0.1"])
    with pytest.raises(EgressDenied):
        fetch(LOOPBACK_ONLY, url, resolver=reverse)
    assert reverse.calls == ["rebind.test"] and len(server.seen) == 1


def test_keep_alive_reuses_the_checked_connection(server: LocalServer) -> None:
    rebinding = ScriptedResolver(["127.0.0.1"], ["10.0.0.1"])
    with guarded_client(LOOPBACK_ONLY, resolver=rebinding) as client:
        for _ in range(3):
            assert client.get(f"http://rebind.test:{server.port}/").status_code == 200
    assert rebinding.calls == ["rebind.test"]


@BOTH
def test_unresolvable_name_is_a_connect_error_not_a_refusal(fetch: Callable[..., httpx.Response]) -> None:
    resolver = ScriptedResolver(["127.0.0.1"], names=["known.test"])
    with pytest.raises(httpx.ConnectError):
        fetch(LOOPBACK_ONLY, "http://unknown.test/", resolver=resolver)
    assert not issubclass(EgressDenied, httpx.TransportError)  # retry loops must not retry refusals


def test_refusal_message_names_the_host_only() -> None:
    with pytest.raises(EgressDenied) as info:
        get(NOBODY, "http://10.0.0.1/v1/items?api_key=SECRET-KEY-123")
    assert info.value.host == "10.0.0.1"
    assert "SECRET" not in str(info.value) and "/v1/items" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# No environment proxies, no redirects, no overrides
# --------------------------------------------------------------------------------------------------


def _proxy_env(monkeypatch: pytest.MonkeyPatch, proxy_url: str) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy_url)


@BOTH
def test_environment_proxy_is_ignored(
    fetch: Callable[..., httpx.Response], server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with local_server() as proxy:
        _proxy_env(monkeypatch, proxy.url)
        # control: plain httpx honours the variables and talks to the "proxy"
        with httpx.Client(timeout=5) as plain:
            plain.get(server.url + "/control")
        assert [s.target for s in proxy.seen] == [f"{server.url}/control"]
        assert server.seen == []

        response = fetch(LOOPBACK_ONLY, server.url + "/guarded")
        assert response.text == "direct"
        assert [s.target for s in server.seen] == ["/guarded"]
        assert len(proxy.seen) == 1  # only the control request


@BOTH
def test_redirects_are_returned_as_is(fetch: Callable[..., httpx.Response], server: LocalServer) -> None:
    response = fetch(LOOPBACK_ONLY, server.url + "/redirect", follow_redirects=True)
    assert response.status_code == 302
    assert response.headers["location"] == "http://169.254.169.254/latest/meta-data/"
    assert [s.target for s in server.seen] == ["/redirect"]


def test_redirects_not_followed_when_streaming(server: LocalServer) -> None:
    async def main() -> int:
        async with guarded_async_client(LOOPBACK_ONLY) as client:
            async with client.stream("GET", server.url + "/redirect", follow_redirects=True) as response:
                return response.status_code

    assert asyncio.run(main()) == 302


@pytest.mark.parametrize(
    "kwargs",
    [
        {"proxy": "http://127.0.0.1:1"},
        {"mounts": {}},
        {"transport": httpx.HTTPTransport()},
        {"trust_env": True},
        {"follow_redirects": True},
    ],
)
def test_factories_refuse_bypass_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(TypeError):
        guarded_client(NOBODY, **kwargs)
    with pytest.raises(TypeError):
        guarded_async_client(NOBODY, **kwargs)


def test_client_settings() -> None:
    with guarded_client(NOBODY) as client:
        assert client.trust_env is False and client.follow_redirects is False
        assert client.timeout.connect == 5.0 and client.timeout.read == 10.0


# --------------------------------------------------------------------------------------------------
# TLS: connect to the checked IP, verify the certificate against the host name, send it as SNI
# --------------------------------------------------------------------------------------------------


def _tls_pair(name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context with a leaf for ``name``, client context trusting only the test CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as chain:
        chain.write(leaf.public_bytes(serialization.Encoding.PEM))
        chain.write(
            leaf_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        chain.flush()
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(chain.name)
    client_ctx = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server_ctx, client_ctx


@pytest.mark.parametrize("mode", ["sync", "async", "proxy"])
def test_tls_verifies_host_name_on_the_pinned_address(mode: str) -> None:
    server_ctx, client_ctx = _tls_pair("egress.test")
    resolver = ScriptedResolver(["127.0.0.1"])
    policy = EgressPolicy(["egress.test", "wrong.test"])

    def fetch(url: str) -> httpx.Response:
        if mode == "sync":
            with guarded_client(policy, timeout=5, resolver=resolver, verify=client_ctx) as client:
                return client.get(url)
        if mode == "proxy":

            async def upstream() -> httpx.Response:
                client = GuardedUpstream(policy, httpx.Timeout(5.0), resolver=resolver, verify=client_ctx)
                try:
                    response = await client.send("GET", httpx.URL(url), {}, None)
                    body = await response.aread()
                    await response.aclose()
                    return httpx.Response(response.status_code, content=body)
                finally:
                    await client.aclose()

            return asyncio.run(upstream())

        async def main() -> httpx.Response:
            async with guarded_async_client(policy, timeout=5, resolver=resolver, verify=client_ctx) as client:
                return await client.get(url)

        return asyncio.run(main())

    with local_server(tls=server_ctx) as tls_server:
        response = fetch(f"https://egress.test:{tls_server.port}/")
        assert response.text == "direct"
        assert tls_server.sni[-1] == "egress.test"
        assert tls_server.seen[-1].host == f"egress.test:{tls_server.port}"
        # same address, a name the certificate does not cover: verification fails
        with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            fetch(f"https://wrong.test:{tls_server.port}/")
        assert len(tls_server.seen) == 1
