"""SQL the dispatcher runs, each statement on the caller's transaction."""

from __future__ import annotations

INSERT_EVENT = """
INSERT INTO events (id, type, payload, occurred_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""

POST = "SELECT id, title, author_id FROM posts WHERE id = $1"

COMMENT = "SELECT post_id, author_id FROM comments WHERE id = $1"

# Everyone who commented on the post before this comment. Comment ids come from one
# identity sequence, so "before" is "smaller id" even when commits interleave.
PARTICIPANTS = """
SELECT DISTINCT author_id FROM comments WHERE post_id = $1 AND id < $2
"""

USERS_BY_NAME = "SELECT id FROM users WHERE username = ANY($1::text[])"

USERS_BY_ID = """
SELECT id, username, email, display_name FROM users WHERE id = ANY($1::bigint[])
"""

DISABLED_TYPES = """
SELECT user_id, type FROM notification_preferences
WHERE user_id = ANY($1::bigint[]) AND NOT enabled
"""

# ON CONFLICT makes a redelivered event, or a second dispatcher racing this one,
# insert nothing: the unique key is (event, user, type).
INSERT_NOTIFICATIONS = """
INSERT INTO notifications (
    event_id, user_id, email, title, message, type, channel, priority, metadata,
    status, last_error, event_occurred_at
)
SELECT $1, r.user_id, r.email, r.title, r.message, r.type, r.channel, r.priority,
       r.metadata, r.status, r.last_error, $2
FROM unnest($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::smallint[], $10::jsonb[], $11::text[], $12::text[])
     AS r(user_id, email, title, message, type, channel, priority, metadata,
          status, last_error)
ON CONFLICT (event_id, user_id, type) DO NOTHING
RETURNING id, user_id, type, channel, priority, status
"""
