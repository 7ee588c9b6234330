from __future__ import annotations

import email
import email.policy
import random
import string

import pytest

from email_sender import mime
from email_sender.mime import build


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_non_ascii_names_and_subject_decode_back_exactly() -> None:
    msg = build(
        notification_id=42,
        to_address="zoe@example.com",
        to_name="Zoë 🚀 Carol",
        subject="Zoë 🚀 mentioned you on “Welcome”",
        text="Bonjour Zoë, ça va ? 🚀",
        html="<p>Bonjour <b>Zoë</b></p>",
        sender="notifications@example.com",
        sender_name="Équipe notiflow",
        domain="example.com",
    )

    raw = msg.data
    header_block = raw.split(b"\r\n\r\n", 1)[0]
    assert all(b < 128 for b in header_block), "headers must be 7-bit on the wire"

    back = parse(raw)
    assert back["To"].addresses[0].display_name == "Zoë 🚀 Carol"
    assert back["To"].addresses[0].addr_spec == "zoe@example.com"
    assert back["From"].addresses[0].display_name == "Équipe notiflow"
    assert str(back["Subject"]) == "Zoë 🚀 mentioned you on “Welcome”"
    assert back.get_body(("plain",)).get_content().strip() == "Bonjour Zoë, ça va ? 🚀"
    assert "<b>Zoë</b>" in back.get_body(("html",)).get_content()


def test_message_id_is_stable_for_a_notification() -> None:
    def make() -> email.message.EmailMessage:
        return parse(
            build(
                notification_id=7,
                to_address="a@example.com",
                to_name="A",
                subject="s",
                text="t",
                html=None,
                sender="n@example.com",
                sender_name="n",
                domain="mail.example.com",
            ).data
        )

    first, second = make(), make()

    assert (
        first["Message-ID"]
        == second["Message-ID"]
        == "<notification-7@mail.example.com>"
    )
    assert first["Auto-Submitted"] == "auto-generated"
    assert not first.is_multipart(), "no HTML part was given"


def test_long_subjects_and_names_fold_and_decode_back_exactly() -> None:
    subject = (
        "Zoë 🚀 Carol mentioned you on “" + "a rather long thread title " * 6 + "”"
    )
    name = "Zoë 🚀 " + "Bartholomew-Featherstonehaugh " * 3

    mail = build(
        notification_id=3,
        to_address="z@example.com",
        to_name=name,
        subject=subject,
        text="hi",
        html="<p>hi</p>",
        sender="n@example.com",
        sender_name="notiflow",
        domain="example.com",
    )

    back = parse(mail.data)
    assert str(back["Subject"]) == subject
    assert back["To"].addresses[0].display_name == name
    assert max(len(line) for line in mail.data.split(b"\r\n")) <= 998


def test_headers_are_written_exactly_as_the_standard_library_writes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Short ASCII headers skip the standard library's folding; every message must
    # still come out byte for byte as compat32 would write it.
    monkeypatch.setattr(mime.secrets, "token_hex", lambda n: "ab" * n)
    standard = email.policy.compat32.clone(linesep="\r\n")
    rng = random.Random(7)
    alphabet = string.ascii_letters + " \t,.;:'\"()<>@=?_-" + "éü🚀中"

    def text(most: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, most)))

    for number in range(300):
        options = {
            "notification_id": number,
            "to_address": "bob@example.com",
            "to_name": text(30),
            "subject": text(120),
            "text": text(200),
            "html": text(100) if number % 3 else None,
            "sender": "notifications@notiflow.localhost",
            "sender_name": text(20),
            "domain": "notiflow.localhost",
            "extra_headers": {"X-Campaign": text(100)} if number % 5 == 0 else None,
        }
        ours = build(**options).data
        monkeypatch.setattr(mime, "_WIRE", standard)
        theirs = build(**options).data
        monkeypatch.undo()
        monkeypatch.setattr(mime.secrets, "token_hex", lambda n: "ab" * n)
        assert _without_date(ours) == _without_date(theirs), options


def _without_date(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\r\n") if not line.startswith(b"Date:")]
