"""Who must hear about a new comment, and why. Pure functions, no I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

AUTHOR = "post_author"
PARTICIPANT = "participant"
MENTIONED = "mentioned"

# An @ that starts a word: not inside an email address (carol@example.com) and not
# doubled (@@bob). The name ends where username characters end, so "@bob," and
# "@bob." mention bob; a name longer than a username can be mentions nobody.
_MENTION = re.compile(r"(?<![\w@.+-])@([A-Za-z0-9_]{1,32})(?![A-Za-z0-9_])")


def mentioned_usernames(body: str) -> list[str]:
    """Usernames mentioned in ``body``, lower-cased, each once, in order."""
    seen: dict[str, None] = {}
    for match in _MENTION.finditer(body):
        seen.setdefault(match.group(1).lower(), None)
    return list(seen)


@dataclass
class Recipient:
    user_id: int
    reasons: list[str] = field(default_factory=list)

    @property
    def mentioned(self) -> bool:
        return MENTIONED in self.reasons


def resolve(
    *,
    commenter_id: int,
    post_author_id: int,
    participant_ids: Iterable[int],
    mentioned_ids: Iterable[int],
) -> list[Recipient]:
    """Everyone to notify, each once with all their reasons; never the commenter."""
    found: dict[int, Recipient] = {}

    def add(user_id: int, reason: str) -> None:
        if user_id == commenter_id:
            return
        recipient = found.setdefault(user_id, Recipient(user_id))
        if reason not in recipient.reasons:
            recipient.reasons.append(reason)

    add(post_author_id, AUTHOR)
    for user_id in participant_ids:
        add(user_id, PARTICIPANT)
    for user_id in mentioned_ids:
        add(user_id, MENTIONED)
    return sorted(found.values(), key=lambda r: r.user_id)
