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
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02

from push_sender.settings import PushSettings

logger = logging.getLogger(__name__)

# Push services refuse tokens valid for more than 24 hours.
TOKEN_LIFETIME_SECONDS = 12 * 3600
REPO_VAR_DIR = Path(__file__).resolve().parents[3] / "var"
PRIVATE_FILE = "private_key.pem"
PUBLIC_FILE = "public_key.txt"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class VapidKeyError(Exception):
    """The configured VAPID key cannot be used; the service refuses to start."""


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
    """The origin of a push endpoint: the ``aud`` claim its service checks."""
    parts = urlsplit(endpoint)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


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
        return Vapid02(private_key=self.private_key).sign(claims)["Authorization"]


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
            "NOTIFLOW_VAPID_PUBLIC_KEY does not match NOTIFLOW_VAPID_PRIVATE_KEY; "
            f"the private key's public half is {keys.application_server_key}"
        )
    return keys


def _parse_private(value: str) -> ec.EllipticCurvePrivateKey:
    text = value.strip()
    if not text.startswith("-----BEGIN"):
        path = Path(text).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise VapidKeyError(
                f"NOTIFLOW_VAPID_PRIVATE_KEY is neither PEM text nor a readable "
                f"file: {path}: {exc.strerror or exc}"
            ) from None
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise VapidKeyError(
            f"NOTIFLOW_VAPID_PRIVATE_KEY is not a PEM key: {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise VapidKeyError("NOTIFLOW_VAPID_PRIVATE_KEY must be an EC P-256 key")
    return key


def _generated(var_dir: Path) -> ec.EllipticCurvePrivateKey:
    folder = var_dir / "vapid"
    path = folder / PRIVATE_FILE
    if path.exists():
        return _parse_private(str(path))

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Written aside and linked into place: two processes starting together agree
    # on whichever pair landed first.
    staging = folder / f".{PRIVATE_FILE}.{os.getpid()}"
    staging.write_bytes(pem)
    staging.chmod(0o600)
    try:
        os.link(staging, path)
    except FileExistsError:
        return _parse_private(str(path))
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
