"""Where the sender may POST: the endpoint policy, by URL and by resolved address.

An endpoint is a server-side request target chosen by a user, so it is checked
twice. By its text, when a browser subscribes and again before every push: https, no
credentials, no fragment, on the allow-list when there is one. Without an allow-list
the host must also be a dotted DNS name (or a canonical global IP address) on port
443: a trailing dot, a single label, ``localhost`` and the numeric shorthands
resolvers accept (``127.1``, ``2130706433``, ``0x7f000001``) are refused, because
each is a way to name an internal address that a look at the text would miss. By its
addresses, when a browser subscribes (a name that does not resolve, or resolves to
anything but global addresses, is refused) and on every connection, since the name's
records may change in between (see ``transport``).

Allow-listed hosts are the operator's choice: any port, and no address check, which
is how the tests reach their stand-in push service on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

# The addresses a name has, as getaddrinfo gives them; injectable so that tests can
# make a public-looking name resolve anywhere without asking real DNS.
Resolve = Callable[[str, int], Awaitable[list[str]]]

HTTPS_PORT = 443
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# A last label of digits or 0x-hex makes resolvers (and the WHATWG URL parser)
# read the whole host as an IPv4 number: 127.1, 2130706433, 0x7f000001, 0177.0.0.1.
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# Where the IANA special-purpose address registries' "Globally Reachable" column and
# Python 3.11's ipaddress disagree, the registries' answer; the most specific block
# holding an address decides, and an address in none is left to ipaddress.
#   https://www.iana.org/assignments/iana-ipv4-special-registry/
#   https://www.iana.org/assignments/iana-ipv6-special-registry/
# Python 3.11 before 3.11.10 calls most of 192.0.0.0/24 (192.0.0.8 too) global and
# none of 2001::/23, exceptions included; 3.11.7 also calls the deprecated 6to4
# relays (192.88.99.0/24) and the newer documentation block (3fff::/20) global.
# Pinned here, the answer does not change with the Python an image ships.
_REGISTRY: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, bool] = {
    ipaddress.ip_network(block): reachable
    for block, reachable in (
        ("192.0.0.0/24", False),  # IETF protocol assignments
        ("192.0.0.9/32", True),  # Port Control Protocol anycast
        ("192.0.0.10/32", True),  # TURN anycast
        ("192.88.99.0/24", False),  # 6to4 relay anycast, deprecated (RFC 7526)
        ("2001::/23", False),  # IETF protocol assignments
        ("2001:1::1/128", True),  # Port Control Protocol anycast
        ("2001:1::2/128", True),  # TURN anycast
        ("2001:3::/32", True),  # AMT
        ("2001:4:112::/48", True),  # AS112-v6
        ("2001:20::/28", True),  # ORCHIDv2
        ("2001:30::/28", True),  # drone remote ID entity tags
        ("3fff::/20", False),  # documentation (RFC 9637)
        # 6to4 (RFC 3056): the registry gives no answer, and Python 3.11 changed
        # its own in 3.11.10. Refused: no push service is reached through 6to4.
        ("2002::/16", False),
    )
}


class UnsafeAddress(Exception):
    """The endpoint's host resolves to an address the sender must not reach.

    Retrying changes nothing until the records change; the push is refused.
    """


class Unresolvable(Exception):
    """The endpoint's host has no address now; it may have one later."""


async def system_resolve(host: str, port: int) -> list[str]:
    """Every address of ``host``, from the event loop's getaddrinfo."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_global(address: str) -> bool:
    """Whether ``address`` is reachable on the public internet, and only there."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 form that carries an IPv4 address is as global as that address.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if ip.teredo:
            embedded = ip.teredo[1]
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_global(str(embedded)):
            return False
        if ip in _NAT64:
            # What an IPv6-only host's DNS64 answers for a public IPv4 address: as
            # public as that address (the registry calls the block reachable;
            # ipaddress calls it reserved).
            return True
    registry = _registry_says(ip)
    if registry is not None:
        return registry
    return ip.is_global and not (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _registry_says(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool | None:
    """Whether the most specific block of ``_REGISTRY`` holding ``ip`` is globally
    reachable; None when no block there holds it."""
    holding = [block for block in _REGISTRY if ip in block]
    if not holding:
        return None
    return _REGISTRY[max(holding, key=lambda block: block.prefixlen)]


_DEFAULT_PORTS = {"https": 443, "http": 80}


def canonical_host(host: str) -> str:
    """``host`` in lower case, an IPv6 address in its shortest form."""
    host = host.lower()
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host).compressed
        except ValueError:
            return host
    return host


def canonical(url: str) -> str:
    """``url`` as a browser writes it: scheme and host in lower case (an IPv6
    address in its shortest form), the port as a plain number and left out when it
    is the scheme's own, the path without ``.`` and ``..`` segments and ``/`` when
    empty, no empty query.

    One device's endpoint has one spelling, so that "an endpoint belongs to the
    user who subscribed it last" cannot be sidestepped by writing it another way.
    For a URL the policy has accepted (no credentials, no fragment).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = canonical_host(parts.hostname or "")
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    path = _without_dot_segments(parts.path) or "/"
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def _without_dot_segments(path: str) -> str:
    """``path`` with its ``.`` and ``..`` segments resolved (RFC 3986, 5.2.4), as
    the HTTP client does before it sends the request; ``%2e`` in such a segment is
    a dot, as it is to a browser."""
    kept: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        dots = segment.lower().replace("%2e", ".")
        if dots in (".", ".."):
            segment = dots
        if segment == ".":
            if last:
                kept.append("")
        elif segment == "..":
            if len(kept) > 1:
                kept.pop()
            if last:
                kept.append("")
        else:
            kept.append(segment)
    return "/".join(kept)


@dataclass(frozen=True)
class EndpointPolicy:
    allowed_hosts: frozenset[str]
    allow_plain_http: bool
    resolve: Resolve = system_resolve
    resolve_timeout: float = 5.0

    def problem(self, url: str) -> str | None:
        """Why ``url`` may not be a push endpoint by its text, or None."""
        try:
            parts = urlsplit(url)
            host = canonical_host(parts.hostname or "")
            port = parts.port  # raises on a malformed port
        except ValueError as exc:
            return f"is not a valid URL: {exc}"
        if port == 0:
            return "has port 0, on which no server listens"
        if parts.scheme not in ("https", "http") or not host:
            return "must be an https URL"
        if parts.username is not None or parts.password is not None:
            return "must not carry credentials"
        if "#" in url:
            # A fragment is never sent in a request: the push would go to
            # another URL than the one stored.
            return "must not have a fragment (#...); push service URLs have none"
        if self.allowed_hosts and host not in self.allowed_hosts:
            return f"host {host!r} is not an allowed push service"
        if parts.scheme == "http" and not (
            self.allow_plain_http and host in self.allowed_hosts
        ):
            return "must be an https URL"
        if host in self.allowed_hosts:
            return None
        if port not in (None, HTTPS_PORT):
            return f"port {port} is not allowed; push services use {HTTPS_PORT}"
        return _host_problem(host)

    async def check(self, url: str) -> str | None:
        """Why ``url`` may not be a push endpoint, its addresses included, or None."""
        problem = self.problem(url)
        if problem:
            return problem
        host = canonical_host(urlsplit(url).hostname or "")
        if host in self.allowed_hosts:
            return None
        try:
            await self.addresses(host, HTTPS_PORT)
        except (UnsafeAddress, Unresolvable) as exc:
            return str(exc)
        return None

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``, each of them checked global."""
        try:
            async with asyncio.timeout(self.resolve_timeout):
                found = await self.resolve(host, port)
        except TimeoutError:
            raise Unresolvable(
                f"host {host!r} did not resolve within {self.resolve_timeout:g}s"
            ) from None
        except OSError as exc:
            raise Unresolvable(f"host {host!r} does not resolve: {exc}") from None
        if not found:
            raise Unresolvable(f"host {host!r} has no address")
        # One bad address is enough to refuse: which one a connection would use
        # is not ours to choose.
        for address in found:
            if not is_global(address):
                raise UnsafeAddress(
                    f"host {host!r} resolves to {address}, not a public address"
                )
        return found


def _host_problem(host: str) -> str | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if is_global(host):
            return None
        return f"host {address} is not a public address"
    if host.endswith("."):
        return f"host {host!r} must not end with a dot"
    labels = host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        return f"host {host!r} is a numeric address form; write a name"
    if not all(_LABEL.match(label) for label in labels):
        return f"host {host!r} is not a valid DNS name"
    if len(labels) < 2:
        return f"host {host!r} is a single-label name; write a fully qualified one"
    if labels[-1] == "localhost":
        return f"host {host!r} is not a public address"
    return None
