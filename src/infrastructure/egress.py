"""Egress guard for every outbound HTTP call (token, revocation, metadata, proxy, previews).

security.md PX-4/PX-5 and §2.1. Three rules:

* **Only public destinations**, unless the operator allow-lists them (``INTEGRATIONS_EGRESS_ALLOW``:
  comma-separated addresses, CIDR networks or host names). Refused: loopback, RFC 1918, link-local
  (cloud metadata at 169.254.169.254), CGNAT 100.64/10, ULA fc00::/7, multicast, unspecified /
  "this network" 0/8, reserved and other non-global ranges, the IPv6 forms that embed such an IPv4
  address (mapped, compatible, NAT64, 6to4), and non-canonical IPv4 literals (``2130706433``,
  ``0x7f.1``, ``017700000001``) whose address is not allow-listed.
* **One resolution per connection.** The network backend resolves the host once, checks *every*
  address, and connects to a checked address; nothing resolves the name again, so DNS rebinding has
  no second answer to slip through. TLS SNI and certificate verification still use the host name
  (httpcore calls ``start_tls(server_hostname=<host>)`` on the stream we return), and the Host header
  is untouched.
* **No detours.** ``trust_env=False`` (an ``HTTPS_PROXY`` in the environment would connect to the
  proxy, bypassing the address check), no ``proxy``/``mounts``/``transport`` overrides, and
  redirects are never followed (a 3xx is returned as-is) even if a caller asks per request.
* **No memory between calls.** The clients keep no cookie jar: a ``Set-Cookie`` from one call is
  never sent on a later one (the client is shared by every user of the service).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio
import httpcore
import httpx

ENV_VAR = "INTEGRATIONS_EGRESS_ALLOW"
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
MAX_ADDRESSES = 8  # connect attempts per host (each one checked)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> addresses`` as strings. Called once per new connection, from a worker thread
in the async client."""


class EgressDenied(Exception):
    """An outbound connection was refused by the egress policy.

    Carries the host and a reason only: never the URL (its path or query may hold an API key).
    Deliberately *not* an ``httpx.TransportError``: callers that retry network errors must not
    retry a refusal.
    """

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"egress to {host!r} denied: {reason}")
        self.host = host
        self.reason = reason


class EgressConfigError(ValueError):
    """An ``INTEGRATIONS_EGRESS_ALLOW`` entry cannot be understood."""


# ------------------------------------------------------------------------------------------------
# Address classification
# ------------------------------------------------------------------------------------------------

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
_METADATA_V4 = ipaddress.IPv4Address("169.254.169.254")

_V4_CATEGORIES: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/8"), "unspecified / this-network address"),
    (_V4("127.0.0.0/8"), "loopback address"),
    (_V4("10.0.0.0/8"), "private address (RFC 1918)"),
    (_V4("172.16.0.0/12"), "private address (RFC 1918)"),
    (_V4("192.168.0.0/16"), "private address (RFC 1918)"),
    (_V4("169.254.0.0/16"), "link-local address"),
    (_V4("100.64.0.0/10"), "shared / CGNAT address (RFC 6598)"),
    (_V4("224.0.0.0/4"), "multicast address"),
    (_V4("240.0.0.0/4"), "reserved address"),
)

_V6_CATEGORIES: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified address"),
    (_V6("::1/128"), "loopback address"),
    (_V6("fe80::/10"), "link-local address"),
    (_V6("fec0::/10"), "site-local address"),
    (_V6("fc00::/7"), "unique local address (ULA)"),
    (_V6("ff00::/8"), "multicast address"),
)

# IPv6 prefixes that carry an IPv4 address in their low (or, for 6to4, high) bits.
_V4_COMPAT = _V6("::/96")
_NAT64 = _V6("64:ff9b::/96")
_SIXTOFOUR = _V6("2002::/16")


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public destination, or ``None`` if it is globally routable."""
    if isinstance(ip, ipaddress.IPv4Address):
        if ip == _METADATA_V4:
            return "link-local address (cloud metadata endpoint)"
        for net, reason in _V4_CATEGORIES:
            if ip in net:
                return reason
        if ip == ipaddress.IPv4Address("255.255.255.255"):
            return "broadcast address"
        if not ip.is_global:
            return "non-global address"
        return None
    embedded = embedded_ipv4(ip)
    if embedded is not None:
        kind, v4 = embedded
        inner = address_problem(v4)
        return f"{kind} form of a {inner}" if inner else None
    for net, reason in _V6_CATEGORIES:
        if ip in net:
            return reason
    if not ip.is_global:
        return "non-global address"
    return None


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, NAT64, 6to4), if any."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _V4_COMPAT and int(ip) > 1:  # not :: or ::1
        return "IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIXTOFOUR and ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    return None


def parse_ip(text: str) -> IPAddress | None:
    """A canonical IP literal (``1.2.3.4``, ``::1``, ``[::1]``; IPv6 zone ids dropped), else ``None``."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_NUMERIC_HOST = re.compile(r"^[0-9a-fx.]+$", re.IGNORECASE)


def odd_ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """The address a non-canonical IPv4 literal denotes (``2130706433``, ``0x7f.1``, ``0177.1``,
    ``127.000.0.1``) under the C library's ``inet_aton`` rules, which the system resolver applies too;
    ``None`` for canonical dotted quads and for names."""
    if not _NUMERIC_HOST.match(host) or not any(c.isdigit() for c in host):
        return None
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return None
    address = ipaddress.IPv4Address(packed)
    return None if str(address) == host else address


# ------------------------------------------------------------------------------------------------
# Policy
# ------------------------------------------------------------------------------------------------

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _normalise_name(host: str) -> str:
    return host.strip().lower().rstrip(".")


class EgressPolicy:
    """Which destinations are allowed beyond the public internet.

    ``allow`` entries: an IP address (``127.0.0.1``, ``::1``), a CIDR network (``10.1.0.0/16``), a
    host name (``intranet.example``; every address it resolves to is then accepted) or a wildcard
    (``*.corp.example``: any subdomain, not the apex). Production default: empty.
    """

    def __init__(self, allow: Iterable[str] = ()) -> None:
        networks: list[IPNetwork] = []
        names: set[str] = set()
        suffixes: set[str] = set()
        for raw in allow:
            entry = raw.strip()
            if not entry:
                continue
            network = _parse_network(entry)
            if network is not None:
                networks.append(network)
                continue
            if odd_ipv4_literal(entry) is not None:
                raise EgressConfigError(f"{ENV_VAR}: {entry!r} is an ambiguous IPv4 literal; write it as a dotted quad")
            name = _normalise_name(entry)
            wildcard = name.startswith("*.")
            if wildcard:
                name = name[2:]
            if not name or not all(_HOST_LABEL.match(label) for label in name.split(".")):
                raise EgressConfigError(f"{ENV_VAR}: {entry!r} is not an address, CIDR network or host name")
            (suffixes if wildcard else names).add(name)
        self._networks = tuple(networks)
        self._names = frozenset(names)
        self._suffixes = frozenset(suffixes)

    @classmethod
    def parse(cls, text: str | None) -> EgressPolicy:
        """From the comma-separated form used by ``INTEGRATIONS_EGRESS_ALLOW``."""
        return cls((text or "").split(","))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EgressPolicy:
        env = os.environ if environ is None else environ
        return cls.parse(env.get(ENV_VAR))

    def __repr__(self) -> str:
        entries = [str(n) for n in self._networks] + sorted(self._names) + sorted(f"*.{s}" for s in self._suffixes)
        return f"EgressPolicy(allow={entries!r})"

    # -- predicates ---------------------------------------------------------------------------
    def allows_name(self, host: str) -> bool:
        name = _normalise_name(host)
        if name in self._names:
            return True
        return any(name.endswith("." + suffix) for suffix in self._suffixes)

    def allows_address(self, ip: IPAddress) -> bool:
        if any(ip.version == net.version and ip in net for net in self._networks):
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return self.allows_address(ip.ipv4_mapped)
        return False

    # -- checks -------------------------------------------------------------------------------
    def check_address(self, host: str, ip: IPAddress, *, name_allowed: bool = False) -> None:
        """Raise :class:`EgressDenied` unless ``ip`` (an address of ``host``) may be contacted."""
        if name_allowed or self.allows_address(ip):
            return
        problem = address_problem(ip)
        if problem is None:
            return
        if parse_ip(host) == ip:
            raise EgressDenied(host, problem)
        raise EgressDenied(host, f"resolves to {ip} ({problem})")

    def literal_addresses(self, host: str) -> list[str] | None:
        """For an IP literal host: the checked address to connect to (IPv4-mapped IPv6 addresses are
        connected as IPv4). ``None`` when ``host`` is a name that needs resolving."""
        ip = parse_ip(host)
        if ip is not None:
            self.check_address(host, ip)
            return [_connect_form(ip)]
        odd = odd_ipv4_literal(host)
        if odd is not None:
            if not self.allows_address(odd):
                raise EgressDenied(host, f"non-canonical IPv4 literal (means {odd})")
            return [str(odd)]
        if not host or any(c in host for c in "/\\@%[] \t\r\n"):
            raise EgressDenied(host, "malformed host")
        return None

    def check_resolved(self, host: str, addresses: Iterable[str]) -> list[str]:
        """Check every resolved address of ``host``; return them (deduplicated) in connect form."""
        name_allowed = self.allows_name(host)
        result: list[str] = []
        for text in addresses:
            ip = parse_ip(text)
            if ip is None:
                raise EgressDenied(host, "resolver returned a non-address")
            self.check_address(host, ip, name_allowed=name_allowed)
            form = _connect_form(ip) if "%" not in text else text
            if form not in result:
                result.append(form)
        if not result:
            raise EgressDenied(host, "no addresses")
        return result[:MAX_ADDRESSES]


def _parse_network(entry: str) -> IPNetwork | None:
    text = entry
    if text.startswith("[") and "]" in text:
        text = text[1:].replace("]", "", 1)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _connect_form(ip: IPAddress) -> str:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def system_resolver(host: str, port: int) -> list[str]:
    """All TCP addresses of ``host`` from the system resolver (``getaddrinfo``)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


def _unresolvable(host: str, exc: Exception) -> str:
    """Why ``host`` could not be resolved: a network failure (``OSError``) or a name with an empty
    or over-long label (``UnicodeError`` from the IDNA codec); not a refusal either way."""
    if isinstance(exc, UnicodeError):
        return f"cannot resolve {host!r}: not a valid host name"
    return f"cannot resolve {host!r}: {getattr(exc, 'strerror', None) or type(exc).__name__}"


def _resolve_sync(policy: EgressPolicy, resolver: Resolver, host: str, port: int) -> list[str]:
    literal = policy.literal_addresses(host)
    if literal is not None:
        return literal
    try:
        answers = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise httpcore.ConnectError(_unresolvable(host, exc)) from None
    return policy.check_resolved(host, answers)


async def resolve_name(
    policy: EgressPolicy, resolver: Resolver, host: str, port: int, error: type[Exception]
) -> list[str]:
    """The checked addresses of the name ``host`` (not a literal), resolved once in a worker
    thread; ``error`` (the caller's connect-error type) when it cannot be resolved."""
    try:
        answers = await anyio.to_thread.run_sync(resolver, host, port, abandon_on_cancel=True)
    except (OSError, UnicodeError) as exc:
        raise error(_unresolvable(host, exc)) from None
    return policy.check_resolved(host, answers)


# ------------------------------------------------------------------------------------------------
# httpcore network backends: resolve once, check, connect to the checked address
# ------------------------------------------------------------------------------------------------


class GuardedAsyncBackend(httpcore.AsyncNetworkBackend):
    def __init__(
        self,
        policy: EgressPolicy,
        resolver: Resolver | None = None,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._policy = policy
        self._resolver = resolver or system_resolver
        self._inner = inner or httpcore.AnyIOBackend()

    async def _addresses(self, host: str, port: int, timeout: float | None) -> list[str]:
        literal = self._policy.literal_addresses(host)
        if literal is not None:
            return literal
        try:
            with anyio.fail_after(timeout):
                return await resolve_name(self._policy, self._resolver, host, port, httpcore.ConnectError)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        last: Exception | None = None
        for address in await self._addresses(host, port, timeout):
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise EgressDenied("unix socket", "unix sockets are not an egress destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedSyncBackend(httpcore.NetworkBackend):
    def __init__(
        self,
        policy: EgressPolicy,
        resolver: Resolver | None = None,
        inner: httpcore.NetworkBackend | None = None,
    ) -> None:
        self._policy = policy
        self._resolver = resolver or system_resolver
        self._inner = inner or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in _resolve_sync(self._policy, self._resolver, host, port):
            try:
                return self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise EgressDenied("unix socket", "unix sockets are not an egress destination")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


# ------------------------------------------------------------------------------------------------
# httpx transports and clients
# ------------------------------------------------------------------------------------------------


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """One verifying context for all guarded clients (building one costs tens of milliseconds)."""
    return httpx.create_ssl_context(verify=True, trust_env=False)


def ssl_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    if verify is True:
        return _default_ssl_context()
    return httpx.create_ssl_context(verify=verify, trust_env=False)


def _pool_kwargs(ctx: ssl.SSLContext, http1: bool, http2: bool, limits: httpx.Limits, retries: int) -> dict[str, Any]:
    return {
        "ssl_context": ctx,
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "http1": http1,
        "http2": http2,
        "retries": retries,
    }


DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class GuardedAsyncTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` whose connections go through :class:`GuardedAsyncBackend`.

    ``verify``: ``True`` (system CAs via certifi), ``False``, or an ``ssl.SSLContext`` (e.g. one
    trusting a test CA). No ``proxy``, no ``trust_env``: those would bypass the check.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        retries: int = 0,
    ) -> None:
        ctx = ssl_context(verify)
        super().__init__(verify=ctx, trust_env=False, http1=http1, http2=http2, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            network_backend=GuardedAsyncBackend(policy, resolver), **_pool_kwargs(ctx, http1, http2, limits, retries)
        )


class GuardedTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` whose connections go through :class:`GuardedSyncBackend`."""

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        retries: int = 0,
    ) -> None:
        ctx = ssl_context(verify)
        super().__init__(verify=ctx, trust_env=False, http1=http1, http2=http2, limits=limits)
        self._pool = httpcore.ConnectionPool(
            network_backend=GuardedSyncBackend(policy, resolver), **_pool_kwargs(ctx, http1, http2, limits, retries)
        )


class _NoCookies(httpx.Cookies):
    """The cookie store of a guarded client: it keeps nothing. One outbound client serves every
    caller, so a cookie that an upstream (or an authorization server) sets must not ride along on
    the next request, which may be another user's; a stock httpx client keeps it in its jar and
    sends it back to that host. Per-request ``cookies=`` still go out with that request only."""

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        return None

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


_NO_COOKIES = _NoCookies()


class _KeepsNoCookies:
    """For the guarded clients: the cookie jar is always empty and cannot be set."""

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        if cookies:
            raise TypeError("guarded clients keep no cookies")


class GuardedAsyncClient(_KeepsNoCookies, httpx.AsyncClient):  # type: ignore[misc]
    """An ``AsyncClient`` that never follows redirects and keeps no cookies, whatever a call asks for."""

    async def send(self, request: httpx.Request, *, follow_redirects: Any = None, **kwargs: Any) -> httpx.Response:
        return await super().send(request, follow_redirects=False, **kwargs)


class GuardedClient(_KeepsNoCookies, httpx.Client):  # type: ignore[misc]
    """A ``Client`` that never follows redirects and keeps no cookies, whatever a call asks for."""

    def send(self, request: httpx.Request, *, follow_redirects: Any = None, **kwargs: Any) -> httpx.Response:
        return super().send(request, follow_redirects=False, **kwargs)


_FORBIDDEN = ("transport", "mounts", "proxy", "proxies", "trust_env", "follow_redirects", "app", "cookies")
_TRANSPORT_KW = ("verify", "http1", "http2", "limits", "retries")


def _split_kwargs(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    bad = [k for k in _FORBIDDEN if k in kw]
    if bad:
        raise TypeError(f"guarded clients do not accept {', '.join(bad)}")
    transport_kw = {k: kw.pop(k) for k in _TRANSPORT_KW if k in kw}
    return transport_kw, kw


def guarded_async_client(
    policy: EgressPolicy,
    timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
    *,
    resolver: Resolver | None = None,
    **kw: Any,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for outbound calls: egress-checked, no env proxies, no redirects.

    ``verify``, ``http1``, ``http2``, ``limits`` and ``retries`` configure the transport;
    other keyword arguments (``headers``, ``base_url``, ``event_hooks`` …) go to the client.
    ``resolver`` replaces ``getaddrinfo`` (tests, or a DNS-over-HTTPS stub).
    """
    transport_kw, client_kw = _split_kwargs(dict(kw))
    transport = GuardedAsyncTransport(policy, resolver=resolver, **transport_kw)
    return GuardedAsyncClient(
        transport=transport, timeout=timeout, trust_env=False, follow_redirects=False, **client_kw
    )


def guarded_client(
    policy: EgressPolicy,
    timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
    *,
    resolver: Resolver | None = None,
    **kw: Any,
) -> httpx.Client:
    """The synchronous twin of :func:`guarded_async_client` (CLI tools, scripts)."""
    transport_kw, client_kw = _split_kwargs(dict(kw))
    transport = GuardedTransport(policy, resolver=resolver, **transport_kw)
    return GuardedClient(transport=transport, timeout=timeout, trust_env=False, follow_redirects=False, **client_kw)
