"""VAPID keys: generated once in development, checked everywhere else."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from push_sender import vapid
from push_sender.settings import PushSettings


def pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def b64(key: ec.EllipticCurvePrivateKey) -> str:
    return vapid.b64url(vapid.public_point(key.public_key()))


def test_development_generates_a_pair_once_and_reuses_it(tmp_path: Path) -> None:
    settings = PushSettings(env="development", var_dir=tmp_path)

    first = vapid.load(settings)
    again = vapid.load(settings)

    assert first.application_server_key == again.application_server_key
    stored = tmp_path / "vapid" / vapid.PRIVATE_FILE
    assert stored.stat().st_mode & 0o077 == 0
    public = (tmp_path / "vapid" / vapid.PUBLIC_FILE).read_text().strip()
    assert public == first.application_server_key


def test_a_replica_with_the_same_process_id_keeps_its_own_key_file_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas in containers sharing the folder are all PID 1: one must not write
    over, link or remove the key another is still putting in place."""
    folder = tmp_path / "vapid"
    folder.mkdir()
    others = {f".{vapid.PRIVATE_FILE}.1": "another replica's key, half written"}
    for name, text in others.items():
        (folder / name).write_text(text)
    monkeypatch.setattr(vapid.os, "getpid", lambda: 1)

    keys = vapid.load(PushSettings(env="development", var_dir=tmp_path))

    for name, text in others.items():
        assert (folder / name).read_text() == text
    stored = vapid._stored(folder / vapid.PRIVATE_FILE)
    assert b64(stored) == keys.application_server_key
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*others, vapid.PRIVATE_FILE, vapid.PUBLIC_FILE]
    )


def test_a_key_is_read_from_a_file_or_from_pem_text(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "vapid.pem"
    path.write_text(pem(key))

    from_file = vapid.load(PushSettings(vapid_private_key=str(path)))
    from_text = vapid.load(PushSettings(vapid_private_key=pem(key)))

    assert from_file.application_server_key == from_text.application_server_key
    raw = base64.urlsafe_b64decode(from_text.application_server_key + "=")
    assert len(raw) == 65 and raw[0] == 4


def test_a_public_key_that_does_not_match_refuses_to_start() -> None:
    key, other = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    wrong = vapid.b64url(vapid.public_point(other.public_key()))

    with pytest.raises(vapid.VapidKeyError, match="does not match"):
        vapid.load(PushSettings(vapid_private_key=pem(key), vapid_public_key=wrong))


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(vapid.VapidKeyError, match="readable PEM file"):
        vapid.load(PushSettings(vapid_private_key=str(tmp_path / "nope.pem")))


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (
            "hunter22-not-a-key",
            "is neither PEM text (-----BEGIN PRIVATE KEY-----...) nor the path of "
            "a readable PEM file (No such file or directory)",
        ),
        (
            "-----BEGIN PRIVATE KEY-----\nhunter22\n-----END PRIVATE KEY-----\n",
            "is not an unencrypted PEM private key",
        ),
    ],
)
def test_an_unusable_private_key_is_refused_naming_the_setting_not_the_value(
    value: str, complaint: str
) -> None:
    with pytest.raises(vapid.VapidKeyError) as refused:
        vapid.load(PushSettings(vapid_private_key=value))

    assert str(refused.value) == f"NOTIFLOW_VAPID_PRIVATE_KEY: {complaint}"
    assert "hunter22" not in str(refused.value)


def test_a_key_on_another_curve_is_refused() -> None:
    other = ec.generate_private_key(ec.SECP384R1())

    with pytest.raises(vapid.VapidKeyError) as refused:
        vapid.load(PushSettings(vapid_private_key=pem(other)))

    assert str(refused.value) == ("NOTIFLOW_VAPID_PRIVATE_KEY: is not an EC P-256 key")


def test_an_unusable_private_key_stops_the_service_with_one_line_and_status_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "push_sender"],
        env={
            "PATH": "/usr/bin:/bin",
            "PORT": "19502",
            "NOTIFLOW_VAPID_PRIVATE_KEY": "hunter22",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "notiflow: invalid setting NOTIFLOW_VAPID_PRIVATE_KEY: is neither PEM text "
        "(-----BEGIN PRIVATE KEY-----...) nor the path of a readable PEM file "
        "(No such file or directory)"
    ]


def test_production_never_generates_a_key() -> None:
    with pytest.raises(ValidationError, match="NOTIFLOW_VAPID_PRIVATE_KEY"):
        PushSettings(env="production", secret_key="s" * 40)


def test_the_token_names_the_push_service_origin_and_expires_within_a_day() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    keys = vapid.VapidKeys(key, "mailto:ops@example.com")

    header = keys.authorization("https://push.example.net:8443/send/abc?x=1", now=1e9)

    scheme, _, params = header.partition(" ")
    fields = dict(p.strip().split("=", 1) for p in params.split(","))
    assert scheme == "vapid" and fields["k"] == keys.application_server_key
    claims = jwt.decode(
        fields["t"],
        key.public_key(),
        algorithms=["ES256"],
        audience="https://push.example.net:8443",
        options={"verify_exp": False},
    )
    assert claims["sub"] == "mailto:ops@example.com"
    assert 0 < claims["exp"] - 1e9 <= 24 * 3600


def test_a_lease_shorter_than_a_delivery_is_refused() -> None:
    with pytest.raises(ValidationError, match="NOTIFLOW_PUSH_LEASE_SECONDS"):
        PushSettings(push_timeout=30, push_lease_seconds=60)


def test_a_push_service_at_an_ipv6_address_is_the_tokens_audience_in_brackets() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    keys = vapid.VapidKeys(key, "mailto:ops@example.com")

    header = keys.authorization("https://[2001:db8::1]:8443/send/abc")

    token = dict(p.strip().split("=", 1) for p in header[len("vapid ") :].split(","))
    claims = jwt.decode(
        token["t"],
        key.public_key(),
        algorithms=["ES256"],
        audience="https://[2001:db8::1]:8443",
    )
    assert claims["sub"] == "mailto:ops@example.com"
