"""The sender address, sender name and Message-ID domain the email sender refuses at
start, each named in one line with exit status 2, and the ones deployments use, which
it takes (an internationalised domain written in IDNA, as every header must be
ASCII)."""

from __future__ import annotations

import logging
import subprocess
import sys
from email import message_from_bytes
from email.policy import default

import pytest
from pydantic import ValidationError

from contracts.settings import describe
from email_sender import app as email_app
from email_sender import mime
from email_sender.app import EmailSettings


@pytest.mark.parametrize(
    ("setting", "value", "complaint"),
    [
        ("mail_from", "not-an-address", "must be a bare address"),
        ("mail_from", "", "must be a bare address"),
        ("mail_from", "notiflow <n@example.com>", "goes in NOTIFLOW_MAIL_FROM_NAME"),
        ("mail_from", "n @example.com", "with no display name or spaces"),
        ("mail_from", "a..b@example.com", "before the @"),
        ("mail_from", "jörg@example.com", "before the @"),
        ("mail_from", f"{'n' * 65}@example.com", "at most 64"),
        ("mail_from", "n@bad>domain", "after the @, a domain name"),
        ("mail_from", "n@", "after the @, a domain name"),
        ("mail_from", "n@192.0.2.1", "after the @, a domain name"),
        ("mail_from", "n@example.com.", "after the @, a domain name"),
        ("mail_from", "n\x00@example.com", "before the @"),
        ("mail_from", "n@exa\x00mple.com", "after the @, a domain name"),
        ("mail_from_name", "Ops\r\nBcc: x@example.com", "no line ends"),
        ("mail_from_name", "Ops\nBcc: x@example.com", "no line ends"),
        ("mail_from_name", "Ops\rteam", "no line ends"),
        ("mail_from_name", "Ops\r\n", "no line ends"),
        ("mail_from_name", "Ops\n\n", "no line ends"),
        ("mail_from_name", "Ops\x00", "NUL or other control characters"),
        ("mail_from_name", "Ops\tteam", "NUL or other control characters"),
        ("mail_from_name", "Ops\x1bteam", "NUL or other control characters"),
        ("mail_from_name", "Ops\x7fteam", "NUL or other control characters"),
        ("mail_from_name", "Ops\x85team", "NUL or other control characters"),
        ("mail_domain", "bad>domain", "must be a domain name"),
        ("mail_domain", "", "must be a domain name"),
        ("mail_domain", "a b.example", "must be a domain name"),
        ("mail_domain", "-mail.example", "must be a domain name"),
        ("mail_domain", "mail..example", "must be a domain name"),
        ("mail_domain", "192.0.2.1", "must be a domain name"),
        ("mail_domain", f"{'a' * 64}.example", "must be a domain name"),
        ("smtp_helo_name", "localhost", "fully qualified name"),
        ("smtp_helo_name", "bad name.example", "fully qualified name"),
        ("smtp_helo_name", "-x.example", "fully qualified name"),
        ("smtp_helo_name", "fe80::1%lo", "with no zone"),
        ("smtp_helo_name", "0.0.0.0", "with no zone"),
        ("smtp_helo_name", "[mail.example.org]", "with no zone"),
    ],
)
def test_a_sender_or_message_id_domain_no_mail_could_carry_is_refused_naming_it(
    setting: str, value: str, complaint: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        EmailSettings(**{setting: value})

    [line] = describe(refused.value).splitlines()
    assert line.startswith(f"NOTIFLOW_{setting.upper()}: "), line
    assert complaint in line
    assert repr(value) in line


@pytest.mark.parametrize(
    ("setting", "value", "why"),
    [
        ("mail_domain", "stra\u200bsse.example", "U+200B ZERO WIDTH SPACE"),
        ("mail_from", "n@stra\u200bsse.example", "U+200B ZERO WIDTH SPACE"),
        ("mail_domain", "bu\u00adcher.example", "U+00AD SOFT HYPHEN"),
        ("mail_domain", "\u2603.example", "cannot be written in IDNA 2008"),
        ("mail_from", "n@\u2603.example", "cannot be written in IDNA 2008"),
    ],
)
def test_a_mail_domain_idna_would_alter_or_not_take_is_refused_saying_why(
    setting: str, value: str, why: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        EmailSettings(**{setting: value})

    [line] = describe(refused.value).splitlines()
    assert line.startswith(f"NOTIFLOW_{setting.upper()}: must be "), line
    assert f"{value!r}; it " in line
    assert why in line


def test_a_mail_domain_idna_2003_would_rewrite_is_kept_as_written() -> None:
    # IDNA 2003 made Straße.example strasse.example, someone else's domain.
    settings = EmailSettings(mail_from="n@Straße.example", mail_domain="Straße.example")

    assert settings.mail_from == "n@xn--strae-oqa.example"
    assert settings.mail_domain == "xn--strae-oqa.example"


@pytest.mark.parametrize(
    ("mail_from", "mail_domain", "sent_from", "message_domain"),
    [
        (
            "notifications@example.com",
            "example.com",
            "notifications@example.com",
            "example.com",
        ),
        (
            "no-reply+notify@mail.example.co.uk",
            "notify-1.mail.example.co.uk",
            "no-reply+notify@mail.example.co.uk",
            "notify-1.mail.example.co.uk",
        ),
        (
            "o'brien.ops@bücher.example",
            "Bücher.example",
            "o'brien.ops@xn--bcher-kva.example",
            "xn--bcher-kva.example",
        ),
        ("ops@localhost", "localhost", "ops@localhost", "localhost"),
    ],
)
def test_the_addresses_deployments_use_are_taken_and_written_in_ascii(
    mail_from: str, mail_domain: str, sent_from: str, message_domain: str
) -> None:
    settings = EmailSettings(mail_from=mail_from, mail_domain=mail_domain)

    mail = mime.build(
        notification_id=7,
        to_address="bob@example.com",
        to_name="Bob",
        subject="hello",
        text="hi",
        html=None,
        sender=settings.mail_from,
        sender_name=settings.mail_from_name,
        domain=settings.mail_domain,
    )

    assert mail.sender == sent_from
    assert mail.message_id == f"<notification-7@{message_domain}>"
    assert f"From: notiflow <{sent_from}>\r\n".encode() in mail.data
    assert mail.data.isascii()


@pytest.mark.parametrize(
    ("written", "name"),
    [
        ("Ops team", "Ops team"),
        # As a YAML block scalar (`|`) gives it, with one line end after it.
        ("Ops team\n", "Ops team"),
        ("Équipe Ops", "Équipe Ops"),
    ],
)
def test_a_sender_name_is_written_into_from_as_one_header(
    written: str, name: str
) -> None:
    settings = EmailSettings(mail_from_name=written)

    mail = mime.build(
        notification_id=7,
        to_address="bob@example.com",
        to_name="Bob",
        subject="hello",
        text="hi",
        html=None,
        sender=settings.mail_from,
        sender_name=settings.mail_from_name,
        domain=settings.mail_domain,
    )

    assert settings.mail_from_name == name
    head = message_from_bytes(mail.data, policy=default)
    assert str(head["From"]) == f"{name} <notifications@notiflow.localhost>"
    assert head["Bcc"] is None
    assert mail.data.isascii()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NOTIFLOW_MAIL_FROM", "not-an-address"),
        ("NOTIFLOW_MAIL_DOMAIN", "bad>domain"),
        ("NOTIFLOW_MAIL_FROM_NAME", "Ops\r\nBcc: x@example.com"),
        ("NOTIFLOW_MAIL_FROM_NAME", "Ops\x01"),
    ],
)
def test_the_email_sender_exits_2_in_one_line_on_an_unusable_mail_setting(
    name: str, value: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "email_sender"],
        env={"PATH": "/usr/bin:/bin", name: value},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"notiflow: invalid setting {name}: must be "), line
    assert repr(value) in line


@pytest.mark.parametrize(
    ("given", "complaint"),
    [
        (
            {"smtp_use_tls": True, "smtp_starttls": True},
            "NOTIFLOW_SMTP_USE_TLS and NOTIFLOW_SMTP_STARTTLS are both true",
        ),
        (
            {"smtp_password": "secret"},
            "NOTIFLOW_SMTP_PASSWORD is set without NOTIFLOW_SMTP_USERNAME",
        ),
        (
            {"smtp_username": "mailer"},
            "NOTIFLOW_SMTP_USERNAME is set without NOTIFLOW_SMTP_PASSWORD",
        ),
        (
            {"smtp_username": "", "smtp_password": "secret"},
            "NOTIFLOW_SMTP_USERNAME is set but empty",
        ),
        (
            {"smtp_username": "mailer", "smtp_password": " "},
            "NOTIFLOW_SMTP_PASSWORD is set but empty",
        ),
    ],
)
def test_smtp_settings_that_contradict_each_other_are_refused_naming_both(
    given: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        EmailSettings(**given)

    assert complaint in describe(refused.value)
    assert "secret" not in describe(refused.value)


def test_implicit_tls_with_starttls_turned_off_and_a_login_are_taken() -> None:
    settings = EmailSettings(
        smtp_use_tls=True,
        smtp_starttls=False,
        smtp_username="mailer",
        smtp_password="secret",
    )

    assert settings.smtp_use_tls and settings.smtp_username == "mailer"


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("mail.example.org", "mail.example.org"),
        (" relay.bücher.example ", "relay.xn--bcher-kva.example"),
        ("192.0.2.7", "[192.0.2.7]"),
        ("[192.0.2.7]", "[192.0.2.7]"),
        ("[IPv6:2001:db8::7]", "[IPv6:2001:db8::7]"),
        ("2001:db8::7", "[IPv6:2001:db8::7]"),
        ("", None),
    ],
)
def test_the_name_given_in_ehlo_is_written_as_smtp_wants_it(
    given: str, said: str | None
) -> None:
    assert EmailSettings(smtp_helo_name=given).smtp_helo_name == said


@pytest.mark.parametrize(
    ("host", "helo", "warned"),
    [
        ("vm", None, True),
        ("localhost", None, True),
        ("mail.example.org", None, False),
        ("vm", "mail.example.org", False),
    ],
)
def test_a_host_name_that_is_not_fully_qualified_is_warned_of_at_start(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    host: str,
    helo: str | None,
    warned: bool,
) -> None:
    monkeypatch.setattr(email_app.socket, "getfqdn", lambda: host)

    with caplog.at_level(logging.WARNING, logger="email_sender.app"):
        email_app.create_app(EmailSettings(smtp_helo_name=helo))

    actions = [getattr(r, "action", "") for r in caplog.records]
    assert ("email.bare_helo_name" in actions) is warned
