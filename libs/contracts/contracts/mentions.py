"""Who a comment's body mentions, read the same way where the comment is taken
and where its notifications are worked out.

A comment may mention at most :data:`MAX_MENTIONS` people: the comments service
refuses a body that mentions more, and the dispatcher notifies no more than that
many of those an event names.
"""

from __future__ import annotations

import re
import unicodedata

# Distinct usernames one comment may mention.
MAX_MENTIONS = 50

# An @ that starts a word: not inside an email address (carol@example.com, and
# o'neil@example.com: no character an address may hold comes right before it),
# not doubled (@@bob), and not in a link (https://example.social/@bob). A name followed
# by another @ is someone's address elsewhere (@bob@example.social), not the local
# bob. The name must end where the word ends: "@bob," "@bob." and "@bob's" mention
# bob, but "@bobé", "@bób" and a name longer than any username mention nobody.
# Usernames are ASCII, the words around them are not: a letter, digit or underscore
# of any script, or a combining mark (category M, which \w leaves out), continues
# the word, so "joe" followed by U+0301 (a decomposed "joé") is not "@joe" either.
# The regular expression finds the candidates; :func:`_in_word` judges the
# characters on either side. A body is judged as a reader sees it: invisible
# formatting characters (category Cf: zero-width spaces and joiners, soft hyphens,
# direction marks) are left out first, so "@bob" + U+200B + "@example.social" is
# the address it looks like, and "@bo" + U+200B + "b" mentions bob.
_MENTION = re.compile(r"(?<![@.+\-'!#$%&=?^|~])@([A-Za-z0-9_]{1,32})(?!@)")
# A link, from its scheme to the next space: an @ in it is part of the link. So
# is an @ right after a slash in a word that starts with a host name
# (example.social/@bob), written without its scheme.
_LINK = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")
_HOST_PATH = re.compile(r"[\w-]+(?:\.[\w-]+)+(?::\d+)?/\S*")
# How far back a host name is looked for: enough for any address people paste,
# and a bound on the work a body of one long word can cause.
_HOST_PATH_REACH = 256
_WORD_CHARACTER = re.compile(r"\w")


def mentioned_usernames(body: str) -> list[str]:
    """Usernames mentioned in ``body``, lower-cased, each once, in order."""
    body = _as_displayed(body)
    seen: dict[str, None] = {}
    links = [link.span() for link in _LINK.finditer(body)] if "://" in body else []
    for match in _MENTION.finditer(body):
        start, end = match.span()
        if _in_word(body, start - 1) or _in_word(body, end):
            continue
        if any(first <= start < last for first, last in links):
            continue
        if start and body[start - 1] == "/" and _after_host(body, start):
            continue
        seen.setdefault(match.group(1).lower(), None)
    return list(seen)


def _as_displayed(text: str) -> str:
    """``text`` without the formatting characters that take no room on screen."""
    if text.isascii():
        return text
    return "".join(c for c in text if unicodedata.category(c) != "Cf")


def _after_host(text: str, end: int) -> bool:
    """Whether the word that ends at ``end`` starts with a host name and a path."""
    begin = end
    while begin > max(0, end - _HOST_PATH_REACH) and not text[begin - 1].isspace():
        begin -= 1
    return _HOST_PATH.fullmatch(text, begin, end) is not None


def _in_word(text: str, index: int) -> bool:
    """Whether the character at ``index`` of ``text`` (if any) belongs to a word."""
    if not 0 <= index < len(text):
        return False
    character = text[index]
    return bool(
        _WORD_CHARACTER.match(character)
        or unicodedata.category(character).startswith("M")
    )
