"""Every setting a service reads is in the operator's documentation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from contracts.settings import Settings
from dispatcher.app import DispatcherSettings
from email_sender.app import EmailSettings
from push_sender.settings import PushSettings
from sse_gateway.app import GatewaySettings

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = (REPO / "README.md", REPO / "services" / "push-sender" / "README.md")


def _variables(settings: type[BaseSettings]) -> list[str]:
    prefix = settings.model_config.get("env_prefix") or ""
    return [
        (field.alias or f"{prefix}{name}").upper()
        for name, field in settings.model_fields.items()
    ]


@pytest.mark.parametrize(
    "settings",
    [Settings, DispatcherSettings, EmailSettings, GatewaySettings, PushSettings],
    ids=lambda cls: cls.__name__,
)
def test_every_setting_a_service_reads_is_documented(
    settings: type[BaseSettings],
) -> None:
    documented = "\n".join(path.read_text() for path in DOCUMENTS)

    missing = [v for v in _variables(settings) if f"`{v}`" not in documented]

    assert missing == []
