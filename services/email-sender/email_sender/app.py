"""Wires the email sender: consumer of email deliveries, lease sweeper, health routes.

The sweeper re-enqueues deliveries whose worker died through the outbox, so this
service also runs an outbox relay.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from contracts import topology
from contracts.messages import DeliveryRequested
from contracts.recovery import LeaseSweeper
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
    email_sweep_seconds: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _lease_outlives_a_delivery(self) -> EmailSettings:
        # A lease shorter than the longest SMTP conversation would let the sweeper
        # hand a row to a second worker while the first is still sending it.
        longest = self.smtp_timeout * smtp.DEADLINE_FACTOR
        if self.email_lease_seconds <= longest:
            raise ValueError(
                f"NOTIFLOW_EMAIL_LEASE_SECONDS ({self.email_lease_seconds:g}) must be "
                f"longer than one whole SMTP conversation may take ({longest:g}s)"
            )
        return self


def create_app(settings: EmailSettings | None = None) -> FastAPI:
    settings = settings or EmailSettings()
    runtime = Runtime(settings, relay=True, consumers=True)
    config = smtp.SmtpConfig(
        host=settings.smtp_host,
        port=settings.smtp_port,
        timeout=settings.smtp_timeout,
        username=settings.smtp_username,
        password=settings.smtp_password,
        use_tls=settings.smtp_use_tls,
        start_tls=settings.smtp_starttls,
    )

    # One connection per message the sender may hold at once.
    transport = smtp.SmtpPool(config, size=settings.email_prefetch)
    worker = EmailWorker(
        lambda: runtime.db,
        transport,
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
        sweeper = LeaseSweeper(
            runtime.db,
            ["email"],
            interval=settings.email_sweep_seconds,
            grace_seconds=settings.email_lease_seconds,
            max_attempts=len(settings.retry_delay_levels) + 1,
        )
        sweeper.start()
        app.state.sweeper = sweeper
        try:
            yield
        finally:
            await sweeper.stop()
            await runtime.stop()
            await transport.close()

    app = FastAPI(title="notiflow email sender", lifespan=lifespan)
    app.state.runtime = runtime
    app.include_router(health_router(runtime))
    return app
