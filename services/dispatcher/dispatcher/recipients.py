"""Who must hear about a new comment, and why. Pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

AUTHOR = "post_author"
PARTICIPANT = "participant"
MENTIONED = "mentioned"


@dataclass
class Recipient:
    user_id: int
    reasons: list[str] = field(default_factory=list)


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
