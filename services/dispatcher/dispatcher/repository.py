"""SQL the dispatcher runs, each statement on the caller's transaction.

Every statement serves a whole batch of events: its parameters are arrays, one
element per event or per row, and its result says which event each row belongs to.
"""

from __future__ import annotations

# The caller passes the events sorted by id. Two dispatchers inserting overlapping
# batches then take the row locks in the same order, and the later one waits for
# the earlier one's commit instead of deadlocking with it. ON CONFLICT makes an
# event stored before (a redelivery, or a second dispatcher racing this one) come
# back from RETURNING as absent: it is a duplicate.
INSERT_EVENTS = """
INSERT INTO events (id, type, payload, occurred_at)
SELECT e.id, e.type, e.payload, e.occurred_at
FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::timestamptz[])
     AS e(id, type, payload, occurred_at)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""

# Takes back the rows of events this transaction inserted and then found to name
# something that does not exist: they are dead-lettered and leave nothing stored.
DELETE_EVENTS = "DELETE FROM events WHERE id = ANY($1::uuid[])"

# Each comment with its post and whether its author exists, so that an event naming
# a missing comment, post or commenter is found before anything is written for it.
COMMENTS = """
SELECT c.id, c.post_id, c.author_id, c.body,
       p.id AS found_post_id, p.title AS post_title, p.author_id AS post_author_id,
       u.id IS NOT NULL AS author_exists
FROM comments c
LEFT JOIN posts p ON p.id = c.post_id
LEFT JOIN users u ON u.id = c.author_id
WHERE c.id = ANY($1::bigint[])
"""

# Per comment, everyone who commented on its post before it. Comment ids come from
# one identity sequence, so "before" is "smaller id" even when commits interleave.
PARTICIPANTS = """
SELECT DISTINCT e.comment_id, c.author_id
FROM unnest($1::bigint[], $2::bigint[]) AS e(post_id, comment_id)
JOIN comments c ON c.post_id = e.post_id AND c.id < e.comment_id
"""

# Everyone named by id (post authors, participants, commenters) or mentioned by
# username, with the channel types each has turned off.
USERS = """
SELECT u.id, u.username, u.email, u.display_name,
       ARRAY(
           SELECT p.type FROM notification_preferences p
           WHERE p.user_id = u.id AND NOT p.enabled
       ) AS disabled_types
FROM users u
WHERE u.id = ANY($1::bigint[]) OR u.username = ANY($2::text[])
"""

# ON CONFLICT makes a row stored before insert nothing: the unique key is
# (event, user, type). Rows come sorted by that key, for the same reason as events.
INSERT_NOTIFICATIONS = """
INSERT INTO notifications (
    event_id, event_occurred_at, user_id, email, title, message, type, channel,
    priority, metadata, status, last_error
)
SELECT r.event_id, r.event_occurred_at, r.user_id, r.email, r.title, r.message,
       r.type, r.channel, r.priority, r.metadata, r.status, r.last_error
FROM unnest($1::uuid[], $2::timestamptz[], $3::bigint[], $4::text[], $5::text[],
            $6::text[], $7::text[], $8::text[], $9::smallint[], $10::jsonb[],
            $11::text[], $12::text[])
     AS r(event_id, event_occurred_at, user_id, email, title, message, type,
          channel, priority, metadata, status, last_error)
ON CONFLICT (event_id, user_id, type) DO NOTHING
RETURNING id, event_id, user_id, type, channel, priority, status
"""
