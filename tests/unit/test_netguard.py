"""The SSRF guard for webhook URLs: refusals, the loopback canary, pinning and rebinding.

No test here reaches beyond 127.0.0.1: public names go through injected resolvers.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from common.errors import InvalidRequest
from common.netguard import (
    Resolver,
    Target,
    UnsafeUrl,
    check_address,
    check_url,
    system_resolver,
)

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:4700:4700::1111"


def fixed(*addresses: str) -> Resolver:
    """A resolver that always answers ``addresses``."""

    def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


# Hosts that reach this machine's loopback (or would, through a sloppy check). Each is also
# used with the canary's port below.
LOOPBACK_HOSTS = [
    "127.0.0.1",
    "127.1",  # short form
    "2130706433",  # decimal
    "0x7f000001",  # hex
    "0177.0.0.1",  # octal
    "017700000001",  # octal, one number
    "0x7f.1",  # hex, short form
    "0.0.0.0",  # connecting to 0.0.0.0 reaches the local host on Linux
    "0",
    "[::1]",
    "[::]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]",
    "[::127.0.0.1]",  # IPv4-compatible
    "localhost",
    "LOCALHOST.",
    "\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54",  # fullwidth "localhost"
    "\u2460\u2461\u2466.0.0.1",  # circled digits: IDNA maps them to 127.0.0.1
]

REFUSED = [
    *[f"http://{host}/hook" for host in LOOPBACK_HOSTS],
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fc00::1]/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://[ff02::1]/",
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[2002:a9fe:a9fe::1]/",  # 6to4 of 169.254.169.254
    "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
    "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
    "http://[2001:0:5db8:d822::f5ff:fffe]/",  # Teredo, client 10.0.0.1
    "http://192.0.2.1/",  # documentation
    "http://198.51.100.7/",
    "http://203.0.113.9/",
    "http://[2001:db8::1]/",
    "http://198.18.0.1/",  # benchmarking
    "ftp://example.com/",
    "file:///etc/passwd",
    "gopher://x/",
    "javascript:alert(1)",
    "example.com/hook",
    "http://user:pass@93.184.216.34/",
    "http://@93.184.216.34/",
    "http://93.184.216.34\\@127.0.0.1/",
    "http:///hook",
    "http://:8080/hook",
    "http://nonexistent.invalid/",
    "http://a..b/",
    "http://%31%32%37.0.0.1/",
    "http://[v1.fe]/",
    "http://93.184.216.34:0/",
    "http://93.184.216.34:99999/",
    "http://93.184.216.34/a b",
    "http://93.184.216.34/\nHost: evil",
    "http://93.184.216.34/" + "a" * 2048,
]


@pytest.mark.parametrize("url", REFUSED)
def test_refused_with_the_system_resolver(url: str) -> None:
    with pytest.raises(UnsafeUrl) as info:
        check_url(url)
    assert isinstance(info.value, InvalidRequest)
    assert info.value.status_code == 400
    assert str(info.value).startswith("webhook_url: ")


def test_the_table_is_large() -> None:
    assert len(REFUSED) >= 30


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://10.0.0.7/", "webhook_url: 10.0.0.7 is a private address"),
        ("http://169.254.169.254/", "webhook_url: 169.254.169.254 is a link-local address"),
        ("ftp://example.com/", "webhook_url: scheme 'ftp' is not allowed; use http or https"),
        ("http://nonexistent.invalid/", "webhook_url: cannot resolve 'nonexistent.invalid'"),
        (
            "http://2130706433/",
            "webhook_url: '2130706433' resolves to 127.0.0.1, which is a loopback address",
        ),
        ("http://100.64.0.1/", "webhook_url: 100.64.0.1 is a shared (carrier-grade NAT) address"),
        ("http://0.0.0.0/", "webhook_url: 0.0.0.0 is an unspecified address"),
        ("http://255.255.255.255/", "webhook_url: 255.255.255.255 is a broadcast address"),
        ("http://192.0.2.1/", "webhook_url: 192.0.2.1 is a documentation address"),
        ("http://198.18.0.1/", "webhook_url: 198.18.0.1 is a benchmarking address"),
        (
            "http://[2002:7f00:1::]/",
            "webhook_url: 2002:7f00:1:: is a 6to4 address of 127.0.0.1 (a loopback address)",
        ),
        (
            "http://[64:ff9b::a00:1]/",
            "webhook_url: 64:ff9b::a00:1 is a NAT64 address of 10.0.0.1 (a private address)",
        ),
        (
            "http://[::ffff:127.0.0.1]/",
            "webhook_url: ::ffff:127.0.0.1 is an IPv4-mapped address of 127.0.0.1"
            " (a loopback address)",
        ),
        (
            "http://localhost/",
            "webhook_url: 'localhost' resolves to 127.0.0.1, which is a loopback address",
        ),
        ("http://user:pass@93.184.216.34/", "webhook_url: credentials in the URL"),
        ("http:///hook", "webhook_url: the URL has no host"),
    ],
)
def test_messages_name_the_reason(url: str, message: str) -> None:
    with pytest.raises(UnsafeUrl) as info:
        check_url(url)
    assert str(info.value).startswith(message)


# --- The canary: a real listener on loopback that must never see a connection -------------


class Canary:
    """A TCP listener on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._hits = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._hits += 1
            conn.close()

    @property
    def hits(self) -> int:
        with self._lock:
            return self._hits

    def wait_for(self, hits: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while self.hits < hits and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.hits

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def canary() -> Iterator[Canary]:
    listener = Canary()
    try:
        yield listener
    finally:
        listener.close()


def connect(target: Target) -> None:
    family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        with contextlib.suppress(OSError):
            sock.connect((target.address, target.port))


def test_no_loopback_spelling_reaches_the_canary(canary: Canary) -> None:
    leaked: list[str] = []
    for host in LOOPBACK_HOSTS:
        url = f"http://{host}:{canary.port}/hook"
        try:
            target = check_url(url)
        except UnsafeUrl:
            continue
        leaked.append(url)  # It must not get here; if it does, do what a sender would.
        connect(target)
    time.sleep(0.2)  # Time for the listener to count a connection that did get through.
    assert leaked == []
    assert canary.hits == 0


def test_the_canary_counts_an_allowed_connection(canary: Canary) -> None:
    target = check_url(f"http://127.0.0.1:{canary.port}/hook", allow_loopback=True)
    assert (target.address, target.port) == ("127.0.0.1", canary.port)
    connect(target)
    assert canary.wait_for(1) == 1


# --- allow_loopback -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/", "http://127.1/", "http://2130706433/", "http://127.8.9.10/"],
)
def test_allow_loopback_permits_plain_loopback(url: str) -> None:
    assert check_url(url, allow_loopback=True).address.startswith("127.")


def test_allow_loopback_permits_ipv6_loopback() -> None:
    target = check_url("http://[::1]:9000/x", allow_loopback=True)
    assert target.address == "::1"
    assert target.pinned_url() == "http://[::1]:9000/x"
    assert target.host_header() == "[::1]:9000"


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/",
        "http://169.254.169.254/",
        "http://0.0.0.0/",
        "http://0/",
        "http://[::]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::127.0.0.1]/",
        "http://[2002:7f00:1::]/",
        "http://[64:ff9b::7f00:1]/",
        "http://192.168.1.1/",
    ],
)
def test_allow_loopback_still_refuses_the_rest(url: str) -> None:
    with pytest.raises(UnsafeUrl, match=r"^webhook_url: "):
        check_url(url, allow_loopback=True)


def test_localhost_is_allowed_only_when_every_address_is_loopback() -> None:
    both = check_url(
        "http://localhost:8000/", allow_loopback=True, resolver=fixed("::1", "127.0.0.1")
    )
    assert both.address == "::1"
    assert both.host_header() == "localhost:8000"
    with pytest.raises(
        UnsafeUrl, match=re.escape("resolves to 10.0.0.1, which is a private address")
    ):
        check_url("http://localhost/", allow_loopback=True, resolver=fixed("::1", "10.0.0.1"))
    with pytest.raises(UnsafeUrl, match="IPv4-mapped"):
        check_url(
            "http://localhost/",
            allow_loopback=True,
            resolver=fixed("127.0.0.1", "::ffff:127.0.0.1"),
        )
    with pytest.raises(UnsafeUrl, match="loopback"):
        check_url("http://localhost/", resolver=fixed("::1"))


# --- Pinning and rebinding ------------------------------------------------------------------


def test_the_host_is_resolved_once_and_pinned() -> None:
    calls: list[tuple[str, int]] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return [PUBLIC_V4] if len(calls) == 1 else ["127.0.0.1"]

    target = check_url("http://hooks.example.com:8080/cb?a=1&b=2", resolver=rebinding)
    assert calls == [("hooks.example.com", 8080)]
    assert target.address == PUBLIC_V4
    assert target.pinned_url() == f"http://{PUBLIC_V4}:8080/cb?a=1&b=2"
    assert target.host_header() == "hooks.example.com:8080"
    assert target.host == "hooks.example.com"
    # The resolver has turned to loopback by now; the target does not follow it.
    assert rebinding("hooks.example.com", 8080) == ["127.0.0.1"]
    assert target.address == PUBLIC_V4


def test_any_unsafe_address_refuses() -> None:
    with pytest.raises(UnsafeUrl, match=re.escape("'hooks.example.com' resolves to 10.0.0.1")):
        check_url("https://hooks.example.com/", resolver=fixed(PUBLIC_V4, "10.0.0.1"))
    with pytest.raises(UnsafeUrl, match=re.escape("169.254.169.254")):
        check_url("https://hooks.example.com/", resolver=fixed(PUBLIC_V6, "169.254.169.254"))


def test_nothing_resolved_refuses() -> None:
    def broken(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    resolvers: list[Resolver] = [fixed(), broken]
    for resolver in resolvers:
        with pytest.raises(UnsafeUrl) as info:
            check_url("https://hooks.example.com/", resolver=resolver)
        assert str(info.value) == "webhook_url: cannot resolve 'hooks.example.com'"


def test_a_resolver_answer_that_is_not_an_address_refuses() -> None:
    with pytest.raises(UnsafeUrl, match="not an IP address"):
        check_url("https://hooks.example.com/", resolver=fixed("0177.0.0.1"))


def test_a_public_name_passes() -> None:
    target = check_url("https://hooks.example.com/x?y=1", resolver=fixed(PUBLIC_V4))
    assert target == Target(
        url="https://hooks.example.com/x?y=1",
        scheme="https",
        host="hooks.example.com",
        port=443,
        address=PUBLIC_V4,
    )
    assert target.pinned_url() == f"https://{PUBLIC_V4}/x?y=1"
    assert target.host_header() == "hooks.example.com"


def test_the_host_is_normalised() -> None:
    target = check_url("HTTPS://Hooks.Example.COM.:443/x#frag", resolver=fixed(PUBLIC_V4))
    assert (target.scheme, target.host, target.port) == ("https", "hooks.example.com", 443)
    assert target.pinned_url() == f"https://{PUBLIC_V4}/x"
    assert target.host_header() == "hooks.example.com"
    idn = check_url("http://B\u00fccher.example/", resolver=fixed(PUBLIC_V4))
    assert idn.host == "xn--bcher-kva.example"


def test_a_public_ipv6_address_passes() -> None:
    target = check_url(f"http://[{PUBLIC_V6}]:8443/h?q", resolver=fixed(PUBLIC_V6))
    assert target.address == PUBLIC_V6
    assert target.pinned_url() == f"http://[{PUBLIC_V6}]:8443/h?q"
    assert target.host_header() == f"[{PUBLIC_V6}]:8443"
    named = check_url("https://v6.example.com/h", resolver=fixed(PUBLIC_V6))
    assert named.pinned_url() == f"https://[{PUBLIC_V6}]/h"
    assert named.host_header() == "v6.example.com"


def test_a_non_default_port_is_kept() -> None:
    target = check_url("https://hooks.example.com:8443/x", resolver=fixed(PUBLIC_V4))
    assert target.port == 8443
    assert target.host_header() == "hooks.example.com:8443"
    assert target.pinned_url() == f"https://{PUBLIC_V4}:8443/x"
    plain = check_url("http://hooks.example.com:80/x", resolver=fixed(PUBLIC_V4))
    assert plain.host_header() == "hooks.example.com"


def test_dns64_and_6to4_of_a_public_address_pass() -> None:
    # 93.184.216.34 is 5db8:d822; DNS64 networks answer like this for IPv4-only hosts.
    for address in ("64:ff9b::5db8:d822", "2002:5db8:d822::1"):
        assert check_url("https://h.example.com/", resolver=fixed(address)).address == address


# --- check_address --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.0.0.7", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.0.1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("169.254.169.254", "a link-local address"),
        ("fe80::1%eth0", "a link-local address"),
        ("100.127.255.254", "a shared (carrier-grade NAT) address"),
        ("224.0.0.251", "a multicast address"),
        ("ff02::fb", "a multicast address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("0.1.2.3", "a 'this network' address"),
        ("255.255.255.255", "a broadcast address"),
        ("240.0.0.1", "a reserved address"),
        ("192.0.0.8", "a reserved (IETF protocol assignment) address"),
        ("2001:db8::1", "a documentation address"),
        ("3fff::1", "a documentation address"),
        ("2001:2::1", "a benchmarking address"),
        ("fec0::1", "a deprecated site-local address"),
        ("64:ff9b:1::1", "a local-use NAT64 address"),
        ("::ffff:127.0.0.1", "an IPv4-mapped address of 127.0.0.1 (a loopback address)"),
        ("::ffff:a00:1", "an IPv4-mapped address of 10.0.0.1 (a private address)"),
        ("::ffff:93.184.216.34", "an IPv4-mapped address; use the plain IPv4 address"),
        ("::93.184.216.34", "a deprecated IPv4-compatible address"),
        ("::127.0.0.1", "an IPv4-compatible address of 127.0.0.1 (a loopback address)"),
        ("2002:a9fe:a9fe::", "a 6to4 address of 169.254.169.254 (a link-local address)"),
        ("64:ff9b::a9fe:a9fe", "a NAT64 address of 169.254.169.254 (a link-local address)"),
        (
            "2001:0:5db8:d822::f5ff:fffe",
            "a Teredo address of 10.0.0.1 (a private address)",
        ),
        ("2001:0:5db8:d822::a247:27dd", "a Teredo address"),
    ],
)
def test_check_address_reasons(ip: str, reason: str) -> None:
    with pytest.raises(UnsafeUrl) as info:
        check_address(ip)
    assert str(info.value).endswith(f" is {reason}")
    assert str(info.value).startswith("webhook_url: ")


@pytest.mark.parametrize("ip", [PUBLIC_V4, "1.1.1.1", "8.8.8.8", PUBLIC_V6, "2a00:1450::1"])
def test_check_address_passes_public_addresses(ip: str) -> None:
    check_address(ip)


def test_check_address_loopback_switch() -> None:
    check_address("127.0.0.1", allow_loopback=True)
    check_address("127.255.0.1", allow_loopback=True)
    check_address("::1", allow_loopback=True)
    for ip in ("::ffff:127.0.0.1", "0.0.0.0", "::", "10.0.0.1", "::127.0.0.1"):
        with pytest.raises(UnsafeUrl):
            check_address(ip, allow_loopback=True)


@pytest.mark.parametrize("ip", ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "", "host"])
def test_check_address_wants_a_canonical_address(ip: str) -> None:
    with pytest.raises(UnsafeUrl, match="is not an IP address"):
        check_address(ip)


def test_system_resolver_reads_odd_spellings_as_loopback() -> None:
    for spelling in ("127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1"):
        assert system_resolver(spelling, 80) == ["127.0.0.1"]
