"""Reading the mail a Maildir holds, as the SMTP sink of ``make run`` writes it."""

from __future__ import annotations

import email
import email.policy
import mailbox
from pathlib import Path


def messages(path: Path) -> list[email.message.EmailMessage]:
    """Every email in the Maildir at ``path``."""
    box = mailbox.Maildir(path, create=False)
    return [
        email.message_from_bytes(box.get_bytes(key), policy=email.policy.default)
        for key in box.keys()
    ]
