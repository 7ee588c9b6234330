"""VAPID (RFC 8292): the application server's key pair and the header it signs.

Every browser subscription is bound to the public key the page handed to
``pushManager.subscribe()``. Changing the private key orphans every stored
subscription (push services answer 403 from then on), which is why the pair a
development machine generates is kept on disk and reused, and why production never
generates one.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from contracts.settings import InvalidSetting
from push_sender.settings import PushSettings

logger = logging.getLogger(__name__)

# Push services refuse tokens valid for more than 24 hours.
TOKEN_LIFETIME_SECONDS = 12 * 3600
REPO_VAR_DIR = Path(__file__).resolve().parents[3] / "var"
PRIVATE_FILE = "private_key.pem"
PUBLIC_FILE = "public_key.txt"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


PRIVATE_SETTING = "NOTIFLOW_VAPID_PRIVATE_KEY"
VAR_DIR_SETTING = "NOTIFLOW_VAR_DIR"


class VapidKeyError(InvalidSetting):
    """The configured VAPID key cannot be used; the service refuses to start,
    exiting with status 2 and one line naming the setting."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; raise ``ValueError`` on anything else."""
    # The standard decoder skips characters outside the alphabet, which would
    # let a NUL or a dot through to the database.
    if not isinstance(text, str) or not _B64URL.fullmatch(text):
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def audience(endpoint: str) -> str:
    """The origin of a push endpoint: the ``aud`` claim its service checks; an
    IPv6 address in brackets, as an origin writes it."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


@dataclass(frozen=True)
class VapidKeys:
    private_key: ec.EllipticCurvePrivateKey
    subject: str

    @property
    def application_server_key(self) -> str:
        """The public key as the page passes it to ``pushManager.subscribe()``."""
        return b64url(public_point(self.private_key.public_key()))

    def authorization(self, endpoint: str, now: float | None = None) -> str:
        """The ``Authorization: vapid t=…, k=…`` value for a request to ``endpoint``."""
        issued = time.time() if now is None else now
        claims = {
            "aud": audience(endpoint),
            "sub": self.subject,
            "exp": int(issued) + TOKEN_LIFETIME_SECONDS,
        }
        # Signed here rather than by py_vapid, whose check of the claims takes
        # no origin with an IPv6 address.
        token = jwt.encode(claims, self.private_key, algorithm="ES256")
        return f"vapid t={token}, k={self.application_server_key}"


def load(settings: PushSettings) -> VapidKeys:
    """The configured pair, or in development one generated once and kept."""
    if settings.vapid_private_key:
        key = _parse_private(settings.vapid_private_key)
    elif settings.env == "test":
        # Tests that care pass their own key; the rest need one that works.
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = _generated(settings.var_dir or REPO_VAR_DIR)

    keys = VapidKeys(key, settings.vapid_subject)
    expected = settings.vapid_public_key
    if expected and expected.strip() != keys.application_server_key:
        raise VapidKeyError(
            "NOTIFLOW_VAPID_PUBLIC_KEY",
            f"does not match {PRIVATE_SETTING}; the private key's public half "
            f"is {keys.application_server_key}",
        )
    return keys


def _parse_private(value: str) -> ec.EllipticCurvePrivateKey:
    """The key ``value`` holds as PEM text, or names as the path of a PEM file.

    A complaint never repeats ``value``: what is not PEM text may be a key
    pasted in another form (a bare base64url key, as some tools print one).
    """
    text = value.strip()
    if not text.startswith("-----BEGIN"):
        try:
            text = Path(text).expanduser().read_text()
        except (OSError, ValueError) as exc:
            raise VapidKeyError(
                PRIVATE_SETTING,
                "is neither PEM text (-----BEGIN PRIVATE KEY-----...) nor the "
                f"path of a readable PEM file ({_why(exc)})",
            ) from None
    return _pem_key(text, PRIVATE_SETTING, "")


def _pem_key(text: str, setting: str, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError):
        raise VapidKeyError(
            setting,
            f"{where}is not an unencrypted PEM private key",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise VapidKeyError(setting, f"{where}is not an EC P-256 key")
    return key


def _stored(path: Path) -> ec.EllipticCurvePrivateKey:
    """The development key kept at ``path``."""
    try:
        text = path.read_text()
    except (OSError, ValueError) as exc:
        raise VapidKeyError(
            VAR_DIR_SETTING,
            f"holds a VAPID key that cannot be read: {path}: {_why(exc)}",
        ) from None
    return _pem_key(text, VAR_DIR_SETTING, f"holds a VAPID key at {path} that ")


def _why(exc: OSError | ValueError) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return "not a text file"


def _generated(var_dir: Path) -> ec.EllipticCurvePrivateKey:
    folder = var_dir / "vapid"
    path = folder / PRIVATE_FILE
    if path.exists():
        return _stored(path)

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Written aside and linked into place: two processes starting together agree
    # on whichever pair landed first. The file aside has a name of its own in
    # every process: replicas in containers sharing the folder are all PID 1.
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{PRIVATE_FILE}.", dir=folder)
    except OSError as exc:
        raise VapidKeyError(
            VAR_DIR_SETTING, f"cannot hold a generated VAPID key: {_why(exc)}"
        ) from None
    staging = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:  # mkstemp made it readable by us alone
            file.write(pem)
        os.link(staging, path)
    except FileExistsError:
        return _stored(path)
    except OSError as exc:
        raise VapidKeyError(
            VAR_DIR_SETTING,
            f"cannot hold a generated VAPID key at {path}: {_why(exc)}",
        ) from None
    finally:
        staging.unlink(missing_ok=True)

    public = b64url(public_point(key.public_key()))
    (folder / PUBLIC_FILE).write_text(public + "\n")
    logger.warning(
        "generated a development VAPID key pair in %s; browsers subscribed with it "
        "stop receiving pushes if it is deleted",
        folder,
        extra={"action": "push.vapid_generated"},
    )
    return key
