"""An SSRF guard for outgoing webhook URLs.

A webhook URL comes from a client and the service then connects to it, so without a check a
client could make the service call its own Redis, the cloud metadata endpoint (169.254.169.254)
or anything else on the private network. :func:`check_url` refuses those URLs.

This is hand-written on purpose: no well-kept library does all three of the things that matter
here. It resolves the host once and checks every resulting address (never the spelling: glibc
reads ``2130706433``, ``0x7f000001``, ``0177.0.0.1`` and ``127.1`` as 127.0.0.1). It pins the
result: the sender must connect to :attr:`Target.address` (see :meth:`Target.pinned_url` and
:meth:`Target.host_header`), so a resolver that changes its answer between the check and the
send (DNS rebinding) cannot redirect the request. And it looks inside IPv6 addresses that carry
an IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, NAT64, Teredo).

Only the standard library is used, so the API and the workers can both import this.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from urllib.parse import SplitResult, urlsplit

from common.errors import InvalidRequest

__all__ = [
    "MAX_URL_LENGTH",
    "Resolver",
    "Target",
    "UnsafeUrl",
    "check_address",
    "check_url",
    "system_resolver",
]

#: ``(host, port) -> IP address strings``; an empty list or an ``OSError`` means "no address".
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048
_PREFIX = "webhook_url: "
_DEFAULT_PORTS = {"http": 80, "https": 443}
# What is left of a host name after IDNA encoding: LDH labels (plus "_", which DNS allows).
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f]")


class UnsafeUrl(InvalidRequest):
    """A webhook URL the service refuses to call (400)."""

    status_code = 400
    message = "webhook_url: not allowed"


@dataclass(frozen=True)
class Target:
    """A checked webhook URL and the one address the sender must connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: str

    def _authority(self, host: str) -> str:
        if ":" in host:
            host = f"[{host}]"
        if self.port != _DEFAULT_PORTS[self.scheme]:
            return f"{host}:{self.port}"
        return host

    def pinned_url(self) -> str:
        """The URL with the host replaced by :attr:`address` (the fragment, never sent, dropped)."""
        parts = urlsplit(self.url)
        query = f"?{parts.query}" if parts.query else ""
        return f"{self.scheme}://{self._authority(self.address)}{parts.path}{query}"

    def host_header(self) -> str:
        """The ``Host`` header to send with :meth:`pinned_url`: the original host (and port)."""
        return self._authority(self.host)


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``getaddrinfo`` gives for ``host``, unique, in the order it gives them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


def _v4(net: str) -> IPv4Network:
    return IPv4Network(net)


def _v6(net: str) -> IPv6Network:
    return IPv6Network(net)


_V4_LOOPBACK = _v4("127.0.0.0/8")
_V4_BROADCAST = IPv4Address("255.255.255.255")
_V6_LOOPBACK = IPv6Address("::1")

# Checked in order: the first match names the reason. ``is_global`` backs these up at the end.
_V4_BLOCKED: tuple[tuple[IPv4Network, str], ...] = (
    (_v4("0.0.0.0/8"), "a 'this network' address"),
    (_v4("10.0.0.0/8"), "a private address"),
    (_v4("100.64.0.0/10"), "a shared (carrier-grade NAT) address"),
    (_v4("127.0.0.0/8"), "a loopback address"),
    (_v4("169.254.0.0/16"), "a link-local address"),
    (_v4("172.16.0.0/12"), "a private address"),
    (_v4("192.0.0.0/24"), "a reserved (IETF protocol assignment) address"),
    (_v4("192.0.2.0/24"), "a documentation address"),
    (_v4("192.88.99.0/24"), "a deprecated 6to4 relay address"),
    (_v4("192.168.0.0/16"), "a private address"),
    (_v4("198.18.0.0/15"), "a benchmarking address"),
    (_v4("198.51.100.0/24"), "a documentation address"),
    (_v4("203.0.113.0/24"), "a documentation address"),
    (_v4("224.0.0.0/4"), "a multicast address"),
    (_v4("240.0.0.0/4"), "a reserved address"),
)

_V6_MAPPED = _v6("::ffff:0:0/96")
_V6_COMPATIBLE = _v6("::/96")
_V6_NAT64 = _v6("64:ff9b::/96")
_V6_6TO4 = _v6("2002::/16")
_V6_TEREDO = _v6("2001::/32")

_V6_BLOCKED: tuple[tuple[IPv6Network, str], ...] = (
    (_V6_MAPPED, "an IPv4-mapped address; use the plain IPv4 address"),
    (_V6_COMPATIBLE, "a deprecated IPv4-compatible address"),
    (_v6("64:ff9b:1::/48"), "a local-use NAT64 address"),
    (_v6("::/8"), "a reserved address"),
    (_v6("100::/64"), "a discard-only address"),
    (_V6_TEREDO, "a Teredo address"),
    (_v6("2001:2::/48"), "a benchmarking address"),
    (_v6("2001::/23"), "a reserved (IETF protocol assignment) address"),
    (_v6("2001:db8::/32"), "a documentation address"),
    (_v6("3fff::/20"), "a documentation address"),
    (_v6("fc00::/7"), "a private address"),
    (_v6("fe80::/10"), "a link-local address"),
    (_v6("fec0::/10"), "a deprecated site-local address"),
    (_v6("ff00::/8"), "a multicast address"),
)


def _fallback_reason(ip: IPv4Address | IPv6Address) -> str | None:
    """What ``ipaddress`` knows beyond the tables (newer Pythons know more ranges)."""
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def _reason_v4(ip: IPv4Address, allow_loopback: bool) -> str | None:
    if allow_loopback and ip in _V4_LOOPBACK:
        return None
    if ip.is_unspecified:
        return "an unspecified address"
    if ip == _V4_BROADCAST:
        return "a broadcast address"
    for net, why in _V4_BLOCKED:
        if ip in net:
            return why
    return _fallback_reason(ip)


def _embedded_v4(ip: IPv6Address) -> tuple[str, list[IPv4Address]] | None:
    """The IPv4 addresses an IPv6 address carries, with the name of the scheme that carries them."""
    low32 = IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _V6_MAPPED:
        return "an IPv4-mapped address", [low32]
    if ip in _V6_COMPATIBLE:
        return "an IPv4-compatible address", [low32]
    if ip in _V6_NAT64:
        return "a NAT64 address", [low32]
    if ip in _V6_6TO4 and ip.sixtofour is not None:
        return "a 6to4 address", [ip.sixtofour]
    if ip in _V6_TEREDO and ip.teredo is not None:
        server, client = ip.teredo
        return "a Teredo address", [server, client]
    return None


def _reason_v6(ip: IPv6Address, allow_loopback: bool) -> str | None:
    if ip == _V6_LOOPBACK:
        return None if allow_loopback else "a loopback address"
    if ip.is_unspecified:
        return "an unspecified address"
    embedded = _embedded_v4(ip)
    if embedded is not None:
        kind, inner_addresses = embedded
        for inner in inner_addresses:
            # Loopback is allowed only in its plain forms, never carried inside IPv6.
            why = _reason_v4(inner, allow_loopback=False)
            if why is not None:
                return f"{kind} of {inner} ({why})"
        if ip in _V6_NAT64 or ip in _V6_6TO4:
            # These reach exactly their (checked, global) IPv4 address; DNS64 networks hand
            # out 64:ff9b:: addresses for ordinary IPv4-only hosts.
            return None
    for net, why in _V6_BLOCKED:
        if ip in net:
            return why
    return _fallback_reason(ip)


def _parse_ip(ip: str) -> IPv4Address | IPv6Address:
    """Parse a canonical IP address, dropping an IPv6 zone id (``%eth0``)."""
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        raise UnsafeUrl(f"{_PREFIX}{ip!r} is not an IP address") from None


def _unsafe_reason(ip: IPv4Address | IPv6Address, allow_loopback: bool) -> str | None:
    if isinstance(ip, IPv4Address):
        return _reason_v4(ip, allow_loopback)
    return _reason_v6(ip, allow_loopback)


def check_address(ip: str, *, allow_loopback: bool = False) -> None:
    """Raise :class:`UnsafeUrl` unless ``ip`` is a globally routable address.

    ``ip`` must be a canonical address string (what a resolver returns); an IPv6 zone id is
    ignored. ``allow_loopback`` lets exactly 127.0.0.0/8 and ``::1`` through.
    """
    parsed = _parse_ip(ip)
    why = _unsafe_reason(parsed, allow_loopback)
    if why is not None:
        raise UnsafeUrl(f"{_PREFIX}{ip.split('%', 1)[0]} is {why}")


def _split(url: str) -> tuple[SplitResult, str, int]:
    """Parse and validate the URL's shape: (parts, scheme, port)."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(f"{_PREFIX}the URL is longer than {MAX_URL_LENGTH} characters")
    if _BAD_CHARS.search(url):
        raise UnsafeUrl(f"{_PREFIX}the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise UnsafeUrl(f"{_PREFIX}not a valid URL ({exc})") from None
    scheme = parts.scheme
    if not scheme:
        raise UnsafeUrl(f"{_PREFIX}the URL needs a scheme; use an http:// or https:// URL")
    if scheme not in _DEFAULT_PORTS:
        raise UnsafeUrl(f"{_PREFIX}scheme {scheme!r} is not allowed; use http or https")
    if "@" in parts.netloc:
        raise UnsafeUrl(f"{_PREFIX}credentials in the URL (user:password@) are not allowed")
    if not parts.hostname:
        raise UnsafeUrl(f"{_PREFIX}the URL has no host")
    try:
        explicit_port = parts.port
    except ValueError:
        raise UnsafeUrl(f"{_PREFIX}the URL has an invalid port") from None
    if explicit_port == 0:
        raise UnsafeUrl(f"{_PREFIX}the URL has an invalid port")
    port = explicit_port if explicit_port is not None else _DEFAULT_PORTS[scheme]
    return parts, scheme, port


def _normal_host(parts: SplitResult) -> str:
    """The host to resolve: IDNA-encoded and lowercase, without a trailing dot or zone id."""
    raw = parts.hostname or ""
    if "[" in parts.netloc:
        # A bracketed literal: it must be an IPv6 address (no IPvFuture, no names).
        literal = raw.split("%", 1)[0]
        try:
            IPv6Address(literal)
        except ValueError:
            raise UnsafeUrl(f"{_PREFIX}[{raw}] is not an IPv6 address") from None
        return literal
    name = raw[:-1] if raw.endswith(".") else raw
    try:
        host = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UnsafeUrl(f"{_PREFIX}{raw!r} is not a valid host name") from None
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise UnsafeUrl(f"{_PREFIX}{raw!r} is not a valid host name")
    return host


def _same_address(host: str, address: IPv4Address | IPv6Address) -> bool:
    """Whether ``host`` is a canonical literal of ``address`` (then "resolves to" says nothing)."""
    try:
        return ipaddress.ip_address(host) == address
    except ValueError:
        return False


def check_url(
    url: str, *, allow_loopback: bool = False, resolver: Resolver | None = None
) -> Target:
    """Check a webhook URL and return the :class:`Target` to connect to, or raise UnsafeUrl.

    The host is resolved exactly once, every address it resolves to must be safe (one unsafe
    address refuses the URL), and the first one becomes :attr:`Target.address`. IP literals in
    any spelling go through the resolver too, so what is checked is what a socket would reach.
    """
    parts, scheme, port = _split(url)
    host = _normal_host(parts)
    resolve = resolver if resolver is not None else system_resolver
    try:
        answers = list(resolve(host, port))
    except (OSError, UnicodeError, ValueError):
        answers = []
    if not answers:
        raise UnsafeUrl(f"{_PREFIX}cannot resolve {host!r}")
    addresses = [_parse_ip(answer) for answer in answers]
    for address in addresses:
        why = _unsafe_reason(address, allow_loopback)
        if why is None:
            continue
        if _same_address(host, address):
            raise UnsafeUrl(f"{_PREFIX}{host} is {why}")
        raise UnsafeUrl(f"{_PREFIX}{host!r} resolves to {address}, which is {why}")
    return Target(url=url, scheme=scheme, host=host, port=port, address=str(addresses[0]))
