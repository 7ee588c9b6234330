"""Which endpoints the policy refuses by their text, and which resolved addresses
count as public, whatever form they come in."""

from __future__ import annotations

import pytest

from push_sender.endpoints import EndpointPolicy, is_global


@pytest.mark.parametrize(
    "address",
    # The last: a public IPv4 address as an IPv6-only host's DNS64 gives it.
    ["93.184.216.34", "2606:2800:220:1::1", "64:ff9b::5db8:d822"],
)
def test_a_public_address_is_global(address: str) -> None:
    assert is_global(address)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fd00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:93.184.216.34",
        "64:ff9b::a00:1",
        "2002:7f00:1::1",
        # 6to4, even around a public IPv4 address.
        "2002:5db8:d822::1",
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
        "not an address",
    ],
)
def test_an_inside_or_special_address_is_not_global(address: str) -> None:
    assert not is_global(address)


@pytest.mark.parametrize(
    "url",
    [
        "https://push.example.net/x#y",
        "https://push.example.net/x#",
        "https://push.example.net#y",
    ],
)
@pytest.mark.parametrize("allowed", [frozenset(), frozenset({"push.example.net"})])
def test_an_endpoint_with_a_fragment_is_refused(
    url: str, allowed: frozenset[str]
) -> None:
    problem = EndpointPolicy(allowed, allow_plain_http=False).problem(url)

    assert problem is not None and "fragment" in problem
