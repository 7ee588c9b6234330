"""Wires the email sender: consumer of email deliveries, health routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from contracts import topology
from contracts.messages import DeliveryRequested
from contracts.runtime import Runtime, health_router
from contracts.settings import Settings
from email_sender import smtp
from email_sender.worker import EmailWorker


class EmailSettings(Settings):
    model_config = SettingsConfigDict(env_prefix="NOTIFLOW_", extra="ignore")

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_use_tls: bool = False
    smtp_starttls: bool | None = None
    smtp_timeout: float = Field(default=10.0, gt=0)
    mail_from: str = "notifications@notiflow.localhost"
    mail_from_name: str = "notiflow"
    mail_domain: str = "notiflow.localhost"
    email_prefetch: int = Field(default=20, ge=1)
    email_lease_seconds: float = Field(default=120.0, gt=0)


def create_app(settings: EmailSettings | None = None) -> FastAPI:
    settings = settings or EmailSettings()
    runtime = Runtime(settings, consumers=True)
    config = smtp.SmtpConfig(
        host=settings.smtp_host,
        port=settings.smtp_port,
        timeout=settings.smtp_timeout,
        username=settings.smtp_username,
        password=settings.smtp_password,
        use_tls=settings.smtp_use_tls,
        start_tls=settings.smtp_starttls,
    )

    worker = EmailWorker(
        lambda: runtime.db,
        config,
        sender=settings.mail_from,
        sender_name=settings.mail_from_name,
        domain=settings.mail_domain,
        retry_delays=settings.retry_delay_levels,
        lease_seconds=settings.email_lease_seconds,
    )
    runtime.subscribe(
        topology.delivery_queue("email"),
        DeliveryRequested,
        worker,
        prefetch=settings.email_prefetch,
        action="email",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="notiflow email sender", lifespan=lifespan)
    app.state.runtime = runtime
    app.include_router(health_router(runtime))
    return app
