from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from pydantic import TypeAdapter, ValidationError

from contracts import auth
from contracts.auth import InvalidToken, issue_token, verify_token
from contracts.settings import DEV_SECRET, Settings, WebUrl, describe, get_settings
from tests.support.data import seed_demo


def test_production_refuses_the_development_secret() -> None:
    with pytest.raises(ValidationError, match="NOTIFLOW_SECRET_KEY"):
        Settings(env="production", secret_key=DEV_SECRET)


def test_production_accepts_a_real_secret() -> None:
    assert Settings(env="production", secret_key="s" * 40).env == "production"


@pytest.mark.parametrize(
    "delays", ["5,soon", "5,,30", "5,30,", ",5", "5, +30", "1_0", "٥", "0,5", ""]
)
def test_retry_delays_must_be_positive_seconds(delays: str) -> None:
    with pytest.raises(ValidationError, match="NOTIFLOW_RETRY_DELAYS"):
        Settings(retry_delays=delays)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # Accepted once, this failed every lease sweep on a date out of range.
        ("pending_republish_seconds", 1e15),
        ("db_command_timeout", 1e12),
        ("db_acquire_timeout", 1e12),
        ("drain_seconds", 1e12),
        ("outbox_sweep_seconds", 1e-6),
        ("outbox_sweep_seconds", 1e12),
        ("http_body_timeout", 0),
    ],
)
def test_times_out_of_their_working_range_are_refused_at_start(
    name: str, value: float
) -> None:
    with pytest.raises(ValidationError, match=name):
        Settings(**{name: value})


def test_retry_delays_may_have_spaces_around_each() -> None:
    assert Settings(retry_delays=" 5, 30 ,120").retry_delay_levels == (5, 30, 120)


def test_a_token_names_its_user() -> None:
    settings = Settings()
    principal = verify_token(issue_token(7, "bob", settings), settings)

    assert (principal.user_id, principal.username) == (7, "bob")


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "missing"), ("garbage", "invalid")],
)
def test_missing_or_malformed_tokens_are_refused(
    token: str | None, message: str
) -> None:
    with pytest.raises(InvalidToken, match=message):
        verify_token(token, Settings())


def test_expired_and_forged_tokens_are_refused() -> None:
    settings = Settings()
    expired = issue_token(7, "bob", settings, ttl_seconds=-10)
    forged = issue_token(7, "bob", Settings(secret_key="another-secret-" + "x" * 30))

    with pytest.raises(InvalidToken, match="expired"):
        verify_token(expired, settings)
    with pytest.raises(InvalidToken, match="invalid"):
        verify_token(forged, settings)


def _signed(settings: Settings, **claims: object) -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": "7", "name": "bob", "aud": "notiflow", "exp": now + 600, **claims},
        settings.secret_key,
        algorithm="HS256",
    )


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_a_token_from_a_host_whose_clock_is_a_little_ahead_is_taken(
    claim: str,
) -> None:
    settings = Settings()
    token = _signed(settings, **{claim: int(time.time()) + 5})

    assert verify_token(token, settings).user_id == 7


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_a_token_dated_well_ahead_is_refused_as_not_valid_yet(claim: str) -> None:
    settings = Settings()
    token = _signed(settings, **{claim: int(time.time()) + 3600})

    with pytest.raises(InvalidToken, match=r"not valid yet.*ahead of this server"):
        verify_token(token, settings)


def test_a_token_expired_a_moment_ago_is_refused_whatever_the_skew_allowed() -> None:
    settings = Settings()
    token = _signed(settings, exp=int(time.time()) - 2)

    with pytest.raises(InvalidToken, match="expired"):
        verify_token(token, settings)


def test_a_refused_secret_is_never_repeated_in_the_complaint() -> None:
    from contracts.settings import describe

    secret = "TopSecretValue-abcdefghij-12345"
    with pytest.raises(ValidationError) as info:
        Settings(env="production", secret_key=secret)

    text = describe(info.value)
    assert "at least 32 characters" in text
    assert "abcdefghij" not in text and "12345" not in text


def test_a_token_for_an_impossible_user_id_is_refused() -> None:
    settings = Settings()

    with pytest.raises(InvalidToken, match="invalid"):
        verify_token(issue_token(10**23, "ghost", settings), settings)


@pytest.mark.parametrize("sub", [" 2", "2 ", "0_2", "+2", "02", "\u0662", "2.0", 2])
def test_a_token_naming_its_user_other_than_in_plain_digits_is_refused(
    sub: object,
) -> None:
    settings = Settings()
    claims = {"sub": sub, "aud": auth.AUDIENCE, "exp": int(time.time()) + 60}
    token = jwt.encode(claims, settings.secret_key, algorithm=auth.ALGORITHM)

    with pytest.raises(InvalidToken, match="invalid"):
        verify_token(token, settings)


def test_a_remembered_token_is_refused_once_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings()
    token = issue_token(7, "bob", settings, ttl_seconds=60)
    assert verify_token(token, settings).user_id == 7
    expires = auth._verified(token, settings.secret_key)[1]

    monkeypatch.setattr(auth, "_now", lambda: expires)

    with pytest.raises(InvalidToken, match="expired"):
        verify_token(token, settings)


def test_a_token_that_passed_under_one_secret_is_refused_under_another() -> None:
    old = Settings(secret_key="the-old-secret-" + "x" * 30)
    new = Settings(secret_key="the-new-secret-" + "y" * 30)
    token = issue_token(7, "bob", old)
    assert verify_token(token, old).user_id == 7

    with pytest.raises(InvalidToken, match="invalid"):
        verify_token(token, new)


def test_a_forged_copy_of_a_remembered_token_is_refused() -> None:
    settings = Settings()
    token = issue_token(7, "bob", settings)
    assert verify_token(token, settings).user_id == 7
    header, claims, signature = token.split(".")
    # The same claims with a signature that is not ours, and the claims of
    # another user under the genuine signature.
    forged = f"{header}.{claims}.{signature[::-1]}"
    other = issue_token(8, "carol", settings).split(".")[1]
    swapped = f"{header}.{other}.{signature}"

    for bad in (forged, swapped):
        with pytest.raises(InvalidToken, match="invalid"):
            verify_token(bad, settings)


def test_cors_origins_are_written_as_a_browser_sends_its_origin() -> None:
    settings = Settings(
        env="test",
        cors_origins="http://app.example/, HTTPS://App.Example:443,"
        "http://[::1]:8081/, https://app.example:8443",
    )

    assert settings.allowed_origins == [
        "http://app.example",
        "https://app.example",
        "http://[::1]:8081",
        "https://app.example:8443",
    ]


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("app.example", "has no scheme"),
        ("//app.example", "has no scheme"),
        ("https://app.example/app", "has a path"),
        ("https://app.example//", "has a path"),
        ("https://app.example/?x=1", "has a query or fragment"),
        ("https://app.example#top", "has a query or fragment"),
        ("https://me@app.example", "has a user name"),
        ("https://app.example:0", "has a port that is no TCP port"),
        ("https://app.example:99999", "has a port that is no TCP port"),
        ("https://", "names no host"),
        ("https://b\u00fccher.example", "is not ASCII (write a host in its xn-- form)"),
        ("*", "is not taken: list each origin"),
    ],
)
def test_a_cors_origin_no_browser_could_send_is_refused_naming_it(
    entry: str, complaint: str
) -> None:
    from contracts.settings import describe

    with pytest.raises(ValidationError) as refused:
        Settings(env="test", cors_origins=f"https://ok.example, {entry}")

    [line] = describe(refused.value).splitlines()
    assert line == (
        f"NOTIFLOW_CORS_ORIGINS: {entry!r} {complaint}; an origin is "
        "scheme://host[:port], as in https://app.example:8443"
    )


@pytest.mark.parametrize(
    "url", ["https://notiflow.example.com", "http://127.0.0.1:8081/notiflow/"]
)
def test_an_absolute_web_url_is_taken_as_it_is(url: str) -> None:
    assert TypeAdapter(WebUrl).validate_python(url) == url


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("not a url", ""),
        ("notiflow.example.com", ""),
        ("/notiflow", ""),
        ("ftp://notiflow.example.com", ""),
        ("https://", "; it names no host"),
        ("https://notiflow.example.com:99999", "; its port must be a number from"),
        ("https://[::1", "; it cannot be read as one"),
        ("https://me:pw@notiflow.example.com", ", with no user name or password"),
        ("https://notiflow.example.com/?x=1", ", with no query or fragment"),
        ("https://notiflow example.com", ", with no spaces"),
        ("https://a<b.example/", "; its host must be an IP address or a name"),
        ("http://-bad-.example/", "; its host must be an IP address or a name"),
        ("http://a..b/", "; its host must be an IP address or a name"),
        ("http://999.1.1.1/", "; its host must be an IP address or a name"),
        ("http://h.example/a%zz", "; each % in its path must start an escape"),
    ],
)
def test_a_web_url_that_is_not_absolute_http_is_refused(
    url: str, complaint: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        TypeAdapter(WebUrl).validate_python(url)

    message = refused.value.errors()[0]["msg"].removeprefix("Value error, ")
    assert message.startswith(
        "must be an absolute http:// or https:// URL, as in https://app.example"
        + complaint
    ), message


@pytest.mark.parametrize(
    ("url", "written"),
    [
        ("https://Bücher.example/für", "https://xn--bcher-kva.example/f%C3%BCr"),
        ('http://127.0.0.1:8081/a>b"c', "http://127.0.0.1:8081/a%3Eb%22c"),
        ("http://[::1]:8081/ü", "http://[::1]:8081/%C3%BC"),
    ],
)
def test_a_web_url_is_written_as_links_in_email_headers_can_carry_it(
    url: str, written: str
) -> None:
    assert TypeAdapter(WebUrl).validate_python(url) == written


@pytest.mark.parametrize("ttl", ["0", "-5"])
def test_the_token_command_refuses_a_lifetime_below_one_second(
    ttl: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        auth.main(["bob", "--ttl", ttl])

    out, err = capsys.readouterr()
    assert refused.value.code == 2
    assert out == ""
    assert (
        f"argument --ttl: must be 1 second or more, got {int(ttl)}: such a token "
        "would have expired when it is printed" in err
    )


def test_the_token_command_refuses_a_lifetime_past_a_year_and_a_day(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as refused:
        auth.main(["bob", "--ttl", "99999999999999999999"])

    out, err = capsys.readouterr()
    assert refused.value.code == 2
    assert out == ""
    assert "argument --ttl: must be at most 31622400 seconds (366 days)" in err


def test_the_token_command_refuses_a_lifetime_given_twice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as refused:
        auth.main(["bob", "--ttl", "1", "--ttl", "2"])

    out, err = capsys.readouterr()
    assert refused.value.code == 2
    assert out == ""
    assert "argument --ttl: given more than once" in err


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["bob", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: username"),
    ],
)
def test_the_token_command_names_what_is_wrong_with_its_arguments(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        auth.main(argv)

    out, err = capsys.readouterr()
    assert refused.value.code == 2
    assert out == ""
    assert err.startswith("usage: ") and " [--ttl TTL] username" in err
    assert complaint in err


@pytest.mark.integration
async def test_the_token_command_prints_a_token_for_the_user_named(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo = await seed_demo(settings.database_url)
    monkeypatch.setenv("NOTIFLOW_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("NOTIFLOW_AMQP_URL", settings.amqp_url)
    get_settings.cache_clear()
    try:
        # main() runs its own event loop, as the command does.
        await asyncio.to_thread(auth.main, ["bob", "--ttl", "60"])
    finally:
        get_settings.cache_clear()

    token = capsys.readouterr().out.strip()
    principal = verify_token(token, settings)
    assert principal.user_id == demo.bob


@pytest.mark.parametrize("written", ["1.0", "+5", "1_000", "5e1", "ten", ""])
def test_a_whole_number_setting_takes_digits_only(
    written: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFLOW_IDEMPOTENCY_KEY_HOURS", written)

    with pytest.raises(ValidationError) as refused:
        Settings()

    assert describe(refused.value) == (
        "NOTIFLOW_IDEMPOTENCY_KEY_HOURS: must be a whole number, written in digits"
    )


def test_a_whole_number_setting_may_have_spaces_around_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFLOW_IDEMPOTENCY_KEY_HOURS", " 48\n")

    assert Settings().idempotency_key_hours == 48
