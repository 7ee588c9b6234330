from __future__ import annotations

import email
import email.policy
import random
import secrets
import string
from datetime import UTC, datetime
from email import charset as charsets
from email.header import Header, decode_header, make_header
from email.headerregistry import Address
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.utils import format_datetime, formataddr
from typing import Any

import pytest

from email_sender import mime
from email_sender.mime import InvalidAddress, Mail, build

STANDARD = email.policy.compat32.clone(linesep="\r\n")

_UTF8 = charsets.Charset("utf-8")
_UTF8.header_encoding = charsets.SHORTEST
_UTF8.body_encoding = charsets.QP


def reference_build(
    *,
    notification_id: int,
    to_address: str,
    to_name: str,
    subject: str,
    text: str,
    html: str | None,
    sender: str,
    sender_name: str,
    domain: str,
    extra_headers: dict[str, Any] | None = None,
    policy: Compat32 = STANDARD,
) -> bytes:
    """The message as the standard library's MIME classes build and flatten it.

    This is how ``build`` used to write every message; it now writes the same
    bytes directly, and these tests hold it to that.
    """
    to = Address(display_name=to_name, addr_spec=to_address.strip())
    body = MIMEText(text, "plain", _UTF8)
    if html:
        msg: MIMEText | MIMEMultipart = MIMEMultipart("alternative")
        msg.set_boundary(f"=_notiflow_{secrets.token_hex(12)}")
        msg.attach(body)
        page = f"<!doctype html><html><body>{html}</body></html>"
        msg.attach(MIMEText(page, "html", _UTF8))
    else:
        msg = body
    msg["From"] = _address("From", sender_name, sender)
    msg["To"] = _address("To", to.display_name, to.addr_spec)
    msg["Subject"] = Header(subject, _UTF8, header_name="Subject")
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = f"<notification-{notification_id}@{domain}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Notiflow-Notification-Id"] = str(notification_id)
    for name, value in (extra_headers or {}).items():
        msg[name] = Header(str(value), _UTF8, header_name=name)
    return msg.as_bytes(policy=policy)


def _address(name: str, display_name: str, address: str) -> str | Header:
    """An address header's value: the name as it is where it is plain ASCII
    and folds into lines of 78 characters, or else RFC 2047 encoded words, each
    folded onto a line of its own as needed."""
    plain = formataddr((display_name, address))
    if (
        display_name.isascii()
        and "=?" not in display_name
        and all(len(w) <= 70 for w in plain.split())
    ):
        return plain
    value = Header(display_name, _UTF8, header_name=name)
    value.append(f"<{address}>", "us-ascii")
    return value


def _display_name(header: str) -> str:
    """The display name of an address header, decoded as RFC 2047 asks: the
    white space between two encoded words is no part of the text."""
    text = str(make_header(decode_header(header)))
    return text.rpartition(" <")[0]


@pytest.fixture
def fixed_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same multipart boundary for ``build`` and the reference."""
    monkeypatch.setattr(secrets, "token_hex", lambda n: "ab" * n)


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
        mail = _plain_to(
            "a@example.com", "A", notification_id=7, domain="mail.example.com"
        )
        return parse(mail.data)

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

    back = email.message_from_bytes(mail.data)
    assert str(make_header(decode_header(back["Subject"]))) == subject
    assert _display_name(back["To"]) == name
    # Every header line folds within 78 characters.
    head = mail.data.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78


def test_headers_are_written_exactly_as_the_standard_library_writes_them(
    fixed_boundary: None,
) -> None:
    # build writes the bytes itself, and short ASCII headers skip the standard
    # library's folding; every message must still come out byte for byte as the
    # MIME classes flattened with compat32 would.
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
        assert _without_date(ours) == _without_date(reference_build(**options)), options


# Pieces of generated text: words, the characters quoted-printable and header
# encoding treat specially, and every kind of line end.
_WORDS = [
    "hello", "Zoë", "naïve", "中文", "🚀", "👩‍💻", "“quoted”", "a=b", "=?utf-8?q?x?=",
    "tab\there", "x" * 90, "é" * 40, "From", ".", "..", "-", "_", "?", '"', "\\",
    "(c)", "<b>", "a,b;c:d", "@", "\x00", "\x7f", "\u00a0", "\u2028", "\x85",
]  # fmt: skip
_SPACES = [" ", " ", " ", "  ", "\t", " \t"]
_LINE_ENDS = ["\n", "\r\n", "\r", "\n\n", "\r\n\r\n"]


def _words(rng: random.Random, most: int) -> str:
    count = rng.randint(0, most)
    parts = []
    for _ in range(count):
        parts.append(rng.choice(_WORDS))
        parts.append(rng.choice(_SPACES))
    return "".join(parts).strip() if rng.random() < 0.7 else "".join(parts)


def _body(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(0, 8)):
        shape = rng.random()
        if shape < 0.15:
            line = "From " + _words(rng, 5)
        elif shape < 0.25:
            line = "." + _words(rng, 3)
        elif shape < 0.4:
            # Right around the 76-character wrap, ending in whitespace or "=".
            line = "y" * rng.randint(70, 80) + rng.choice(["", " ", "\t", "=", "é"])
        elif shape < 0.5:
            line = "".join(rng.choice("ab é=\t") for _ in range(rng.randint(0, 300)))
        else:
            line = _words(rng, 30)
        lines.append(line + rng.choice(_LINE_ENDS))
    body = "".join(lines)
    return body if rng.random() < 0.5 else body.rstrip("\r\n")


def _options(rng: random.Random, number: int) -> dict[str, Any]:
    long_subject = "Zoë 🚀 mentioned you on “" + "a long thread title " * 8 + "”"
    extra: dict[str, Any] | None = None
    if number % 3 == 0:
        extra = {
            "List-Unsubscribe": f"<https://notiflow.example.com/u/{number}>",
            "X-Campaign": rng.choice([_words(rng, 20), number, "", "x" * 120]),
        }
    return {
        "notification_id": rng.choice([number, 10**18 + number]),
        "to_address": rng.choice(
            ["bob@example.com", " first.last+tag@mail.example.org ", "x@y.co"]
        ),
        "to_name": rng.choice(["", "Bob", "Zoë 🚀 Carol", _words(rng, 12)]),
        "subject": rng.choice(["", "Hi", long_subject, _words(rng, 25)]),
        "text": _body(rng),
        "html": rng.choice([None, "", "<p>hi</p>", _body(rng)]),
        "sender": "notifications@notiflow.example.com",
        "sender_name": rng.choice(["notiflow", "Équipe notiflow", _words(rng, 8)]),
        "domain": rng.choice(
            ["notiflow.example.com", "a-domain-long-enough-to-fold." * 2 + "example"]
        ),
        "extra_headers": extra,
    }


def test_build_writes_what_the_mime_classes_write(fixed_boundary: None) -> None:
    # Non-ASCII and long names and subjects that fold, bodies with lines that
    # quoted-printable wraps or escapes, lines starting with "From " or ".", CR, LF
    # and CRLF, text-only messages, extra headers, a Message-ID too long to fit.
    rng = random.Random(20240611)
    for number in range(400):
        options = _options(rng, number)
        ours = build(**options).data
        assert _without_date(ours) == _without_date(reference_build(**options)), options


def test_a_name_compat32_would_break_is_written_as_before(
    fixed_boundary: None,
) -> None:
    # compat32 breaks a header's line at a vertical tab, a form feed or a file
    # separator; a short ASCII header is written whole instead, as it always was.
    for name in ["Bob\x0bSmith", "Bob\x0cSmith", "Bob\x1cSmith"]:
        options: dict[str, Any] = {
            "notification_id": 1,
            "to_address": "bob@example.com",
            "to_name": name,
            "subject": "s",
            "text": "t",
            "html": "<p>t</p>",
            "sender": "n@example.com",
            "sender_name": name,
            "domain": "example.com",
        }
        old = reference_build(**options, policy=mime._WIRE)
        assert _without_date(build(**options).data) == _without_date(old)


@pytest.mark.parametrize(
    "address",
    ["", "   ", None, "not an address", "a@@b.com", "bøb@example.com", "a@b..ü.com"],
)
def test_a_bad_address_is_refused_every_time(address: str | None) -> None:
    for _ in range(2):
        with pytest.raises(InvalidAddress):
            build(
                notification_id=1,
                to_address=address,  # type: ignore[arg-type]
                to_name="Bob",
                subject="s",
                text="t",
                html=None,
                sender="n@example.com",
                sender_name="n",
                domain="example.com",
            )


def _plain_to(
    address: str, name: str, *, notification_id: int = 1, domain: str = "example.com"
) -> Mail:
    """The smallest message to ``name`` at ``address``."""
    return build(
        notification_id=notification_id,
        to_address=address,
        to_name=name,
        subject="s",
        text="t",
        html=None,
        sender="n@example.com",
        sender_name="n",
        domain=domain,
    )


def test_each_display_name_of_an_address_gets_its_own_to_header() -> None:
    def to(name: str) -> tuple[str, bytes]:
        mail = _plain_to("bob@example.com", name)
        (line,) = [x for x in mail.data.split(b"\r\n") if x.startswith(b"To:")]
        return parse(mail.data)["To"].addresses[0].display_name, line

    bob, zoe, bob_again = to("Bob"), to("Zoë"), to("Bob")

    assert bob == ("Bob", b"To: Bob <bob@example.com>")
    assert zoe[0] == "Zoë"
    assert zoe[1] != bob[1]
    assert bob_again == bob


@pytest.mark.parametrize(
    "name",
    ["Dave\r\nBcc: injected@example.com", "Dave\nBcc: injected@example.com"],
    ids=["crlf", "lf"],
)
def test_a_line_break_in_a_recipients_name_is_a_space_and_adds_no_header(
    name: str,
) -> None:
    mail = _plain_to("dave@example.com", name)

    back = parse(mail.data)
    assert back["To"].addresses[0].display_name == "Dave Bcc: injected@example.com"
    assert back["To"].addresses[0].addr_spec == "dave@example.com"
    assert back["Bcc"] is None
    assert mail.recipients == ("dave@example.com",)


def _without_date(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\r\n") if not line.startswith(b"Date:")]


def test_an_internationalised_domain_is_written_in_idna_in_header_and_envelope() -> (
    None
):
    mail = build(
        notification_id=1,
        to_address="bob@bücher.example",
        to_name="Bob",
        subject="s",
        text="t",
        html=None,
        sender="n@example.com",
        sender_name="n",
        domain="example.com",
    )

    assert mail.recipients == ("bob@xn--bcher-kva.example",)
    assert b"To: Bob <bob@xn--bcher-kva.example>" in mail.data


def _sent_to(address: str) -> tuple[str, ...]:
    return build(
        notification_id=1,
        to_address=address,
        to_name="Bob",
        subject="s",
        text="t",
        html=None,
        sender="n@example.com",
        sender_name="n",
        domain="example.com",
    ).recipients


def test_a_recipient_domain_is_written_by_idna_2008_and_not_turned_into_another() -> (
    None
):
    # IDNA 2003 wrote Straße.example as strasse.example and the final sigma of
    # βόλος as a σ: someone else's domains.
    assert _sent_to("bob@Straße.example") == ("bob@xn--strae-oqa.example",)
    assert _sent_to("bob@βόλος.example") == ("bob@xn--nxasmm1c.example",)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("bob@stra\u200bsse.example", "U+200B ZERO WIDTH SPACE, which is invisible"),
        ("bob@bu\u00adcher.example", "U+00AD SOFT HYPHEN, which is invisible"),
        ("bob@\u2603.example", "cannot be written in IDNA 2008"),
    ],
)
def test_a_recipient_domain_idna_would_alter_or_not_take_is_refused(
    address: str, why: str
) -> None:
    with pytest.raises(InvalidAddress) as refused:
        _sent_to(address)

    assert f"invalid recipient address {address!r}: the domain " in str(refused.value)
    assert why in str(refused.value)


UNSUBSCRIBE = (
    "https://notify.example.com/unsubscribe?token=7.email." + "Ab-_" * 10 + "xyz"
)


def _with_unsubscribe(url: str | None, html: str | None = "<p>hi</p>") -> bytes:
    return build(
        notification_id=7,
        to_address="bob@example.com",
        to_name="Bob",
        subject="s",
        text="t",
        html=html,
        sender="n@example.com",
        sender_name="n",
        domain="example.com",
        unsubscribe_url=url,
    ).data


@pytest.mark.parametrize("html", ["<p>hi</p>", None])
def test_an_email_with_an_unsubscribe_url_offers_one_click_unsubscribe(
    html: str | None,
) -> None:
    raw = _with_unsubscribe(UNSUBSCRIBE, html)

    back = parse(raw)
    assert back["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>"
    assert back["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # On one line as it is: no encoded word, no folding inside the brackets.
    assert f"\r\nList-Unsubscribe: <{UNSUBSCRIBE}>\r\n".encode() in raw


def test_an_email_without_an_unsubscribe_url_has_no_such_headers() -> None:
    back = parse(_with_unsubscribe(None))

    assert "List-Unsubscribe" not in back
    assert "List-Unsubscribe-Post" not in back


@pytest.mark.parametrize(
    "url",
    [
        "https://notify.example.com/unsubscribe?token=a\r\nBcc: x@example.com",
        "https://notify.example.com/unsubscribe?token=a>",
        "https://bücher.example/unsubscribe?token=a",
        "https://notify.example.com/" + "x" * 1000,
    ],
)
def test_an_unsubscribe_url_that_cannot_be_written_as_it_is_is_refused(
    url: str,
) -> None:
    with pytest.raises(ValueError, match="an unsubscribe URL must be ASCII"):
        _with_unsubscribe(url)


def test_a_recipient_whose_local_part_is_not_ascii_is_refused_saying_so() -> None:
    with pytest.raises(InvalidAddress) as refused:
        _sent_to("zoë@example.com")

    assert str(refused.value) == (
        "invalid recipient address 'zoë@example.com': the part before the @ is not "
        "ASCII, and only ASCII local parts can be sent to"
    )


def _mail_to(name: str, address: str) -> Mail:
    """A plain-text email to ``name`` at ``address``."""
    return build(
        notification_id=3,
        to_address=address,
        to_name=name,
        subject="Hi",
        text="hi",
        html=None,
        sender="n@example.com",
        sender_name="notiflow",
        domain="example.com",
    )


@pytest.mark.parametrize(
    "name",
    ["🚀" * 400, "é" * 370, "Jörg " * 60, "x" * 1000, "Ünïcødé " * 30],
    ids=["rockets", "accents", "words", "one-long-word", "spaced"],
)
def test_a_long_display_name_folds_into_short_lines_a_strict_server_takes(
    name: str,
) -> None:
    mail = _mail_to(name, "frank@example.com")

    head = mail.data.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    to = email.message_from_bytes(mail.data)["To"]
    assert _display_name(to) == name
    assert to.endswith("<frank@example.com>")


def test_a_display_name_that_reads_as_an_encoded_word_is_itself_encoded() -> None:
    mail = _mail_to("Jo =?utf-8?q?evil?= Smith", "jo@example.com")

    to = email.message_from_bytes(mail.data)["To"]
    assert "=?utf-8?q?evil?=" not in to
    assert _display_name(to) == "Jo =?utf-8?q?evil?= Smith"
