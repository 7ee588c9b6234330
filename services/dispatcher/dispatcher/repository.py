"""SQL the dispatcher runs: one statement to read a batch's facts, one to store it.

Both serve a whole batch of events: parameters are arrays, one element per event or
per row, and results say which event each row belongs to. Neither needs a
transaction around it. :data:`LOOKUP` only reads, in one snapshot. :data:`STORE`
writes the event rows, the notification rows and the delivery messages at once, so
they commit together or not at all.

Some results are arrays of anonymous records, which asyncpg returns as tuples; the
``*_FIELDS`` tuples name their positions. JSON inside such a record travels as text:
asyncpg's JSON codec does not decode it there.
"""

from __future__ import annotations

COMMENT_FIELDS = (
    "id",
    "post_id",
    "author_id",
    "body",
    "found_post_id",
    "post_title",
    "post_author_id",
    "author_exists",
)
EARLIER_FIELDS = ("comment_id", "author_id")
USER_FIELDS = ("id", "username", "email", "display_name", "disabled_types")

# For events $1, about comments $2 on posts $3 mentioning usernames $4:
#
# * ``stored``: the events stored before, which need nothing more;
# * ``dispatched``: (comment, event) for each comment an event under another id
#   was stored for: it is dispatched already;
# * ``comments``: each comment with its post and whether its author exists, so that
#   an event naming a missing comment, post or commenter is found before anything
#   is written for it;
# * ``earlier``: per comment, everyone who commented on its post before it: a
#   smaller comment id (one identity sequence). The comments service commits the
#   comments of one post in the order of their ids, so all of those are committed
#   by the time the event is dispatched;
# * ``users``: everyone named by id (commenters, post authors, earlier commenters)
#   or mentioned by username, with the channel types each has turned off.
LOOKUP = """
WITH wanted AS (
    SELECT * FROM unnest($2::bigint[], $3::bigint[]) AS w(comment_id, post_id)
), found AS (
    SELECT c.id, c.post_id, c.author_id, c.body,
           p.id AS found_post_id, p.title AS post_title,
           p.author_id AS post_author_id, u.id IS NOT NULL AS author_exists
    FROM comments c
    LEFT JOIN posts p ON p.id = c.post_id
    LEFT JOIN users u ON u.id = c.author_id
    WHERE c.id = ANY($2::bigint[])
), earlier AS (
    SELECT DISTINCT w.comment_id, c.author_id
    FROM wanted w
    JOIN comments c ON c.post_id = w.post_id AND c.id < w.comment_id
), people AS (
    SELECT u.id, u.username, u.email, u.display_name,
           ARRAY(
               SELECT p.type FROM notification_preferences p
               WHERE p.user_id = u.id AND NOT p.enabled
           ) AS disabled_types
    FROM users u
    WHERE u.id = ANY(ARRAY(
              SELECT author_id FROM found
              UNION SELECT post_author_id FROM found
              UNION SELECT author_id FROM earlier
          ))
       OR u.username = ANY($4::text[])
)
SELECT ARRAY(SELECT id FROM events WHERE id = ANY($1::uuid[])) AS stored,
       ARRAY(SELECT ROW(e.comment_id, e.id) FROM events e
             WHERE e.comment_id = ANY($2::bigint[])
               AND e.id <> ALL($1::uuid[])) AS dispatched,
       ARRAY(SELECT ROW(f.*) FROM found f) AS comments,
       ARRAY(SELECT ROW(e.*) FROM earlier e) AS earlier,
       ARRAY(SELECT ROW(p.*) FROM people p) AS users
"""

# The event stored for each of comments $1, when some is.
DISPATCHED = "SELECT comment_id, id FROM events WHERE comment_id = ANY($1::bigint[])"

NOTIFICATION_FIELDS = ("id", "event_id", "type", "channel", "status")
# How many array parameters :data:`STORE` takes for the rows ($7–$18).
ROW_PARAMETERS = 12
QUEUED_FIELDS = (
    "id",
    "exchange",
    "routing_key",
    "message_id",
    "headers",
    "body",
    "priority",
    "created_at",
)

# Stores the events, their notification rows and the delivery messages of the rows
# left ``pending``, as one statement.
#
# Events ($2–$6, one element per event, sorted by id): ``ON CONFLICT`` makes an event
# stored before (a redelivery, or a second dispatcher racing this one) come back
# from RETURNING as absent, and its rows are not inserted: it is a duplicate. So
# does an event whose comment another event, under another id, was stored for
# since the lookup (events_comment_id_key): a comment is dispatched once. Sorted
# ids make two dispatchers inserting overlapping batches take the locks in the same
# order, so the later one waits for the earlier one's commit instead of deadlocking.
#
# Rows ($7–$18, one element per row, sorted by the unique key (event, user, type)
# for the same reason). ``ON CONFLICT`` is a second line of defence: a fresh event
# has no rows yet.
#
# Messages: the pending rows of one channel type and priority travel together, the
# batch's events mixed, up to $19 in a DeliveryBatch; a row alone is a plain
# DeliveryRequested. PostgreSQL writes the JSON, with $20 and $21 as the
# ``schema_version`` of a DeliveryRequested and of a DeliveryBatch, and each event's
# ``occurred_at`` ($5) as the client wrote it, so that it equals what the models
# would serialise. A message of one event carries that event's trace context ($6)
# and id in its headers, and a message of one row names the row too; in a message
# of several events, each delivery carries its own event's trace context instead.
# $22 is the exchange.
#
# $1 'on' marks the messages as handed to this process's relay: the outbox's trigger
# then sends no NOTIFY.
STORE = """
WITH handed AS (
    SELECT set_config('notiflow.outbox_handoff', $1, true)
), batch AS (
    SELECT * FROM unnest($2::uuid[], $3::jsonb[], $4::timestamptz[], $5::text[],
                         $6::jsonb[])
        AS e(id, payload, occurred_at, occurred_at_json, trace)
), fresh AS (
    INSERT INTO events (id, type, payload, occurred_at, comment_id)
    SELECT id, 'comment.created', payload, occurred_at,
           (payload->>'comment_id')::bigint
    FROM batch ORDER BY id
    ON CONFLICT DO NOTHING
    RETURNING id
), stored AS (
    INSERT INTO notifications (
        event_id, event_occurred_at, user_id, email, title, message, type, channel,
        priority, metadata, status, last_error
    )
    SELECT r.event_id, r.event_occurred_at, r.user_id, r.email, r.title, r.message,
           r.type, r.channel, r.priority, r.metadata, r.status, r.last_error
    FROM unnest($7::uuid[], $8::timestamptz[], $9::bigint[], $10::text[],
                $11::text[], $12::text[], $13::text[], $14::text[], $15::smallint[],
                $16::jsonb[], $17::text[], $18::text[])
         AS r(event_id, event_occurred_at, user_id, email, title, message, type,
              channel, priority, metadata, status, last_error)
    WHERE r.event_id IN (SELECT id FROM fresh)
    ON CONFLICT (event_id, user_id, type) DO NOTHING
    RETURNING id, event_id, user_id, type, channel, priority, status
), chunked AS (
    SELECT s.*, (row_number() OVER (
               PARTITION BY s.type, s.priority ORDER BY s.id
           ) - 1) / $19 AS chunk
    FROM stored s
    WHERE s.status = 'pending'
), shapes AS (
    SELECT type, priority, chunk, min(id) AS first, count(*) AS size,
           (array_agg(event_id ORDER BY id))[1] AS event_id,
           count(DISTINCT event_id) > 1 AS mixed
    FROM chunked
    GROUP BY type, priority, chunk
), messages AS (
    SELECT m.type, m.priority, m.first, m.size, m.event_id, m.mixed,
           json_agg(json_build_object(
               'schema_version', $20::text,
               'notification_id', c.id,
               'event_id', c.event_id,
               'user_id', c.user_id,
               'type', c.type,
               'channel', c.channel,
               'priority', c.priority,
               'event_occurred_at', b.occurred_at_json,
               'trace', CASE WHEN m.mixed THEN b.trace END
           ) ORDER BY c.id) AS items
    FROM shapes m
    JOIN chunked c USING (type, priority, chunk)
    JOIN batch b ON b.id = c.event_id
    GROUP BY m.type, m.priority, m.chunk, m.first, m.size, m.event_id, m.mixed
), queued AS (
    INSERT INTO outbox (exchange, routing_key, message_id, headers, body, priority)
    SELECT $22::text, m.type,
           CASE WHEN m.size = 1 THEN 'notification-' || m.first
                ELSE 'notifications-' || m.first || '+' || m.size END,
           CASE WHEN m.mixed THEN '{}'::jsonb
                WHEN m.size = 1
                THEN b.trace || jsonb_build_object(
                    'event_id', b.id::text, 'notification_id', m.first)
                ELSE b.trace || jsonb_build_object('event_id', b.id::text) END,
           convert_to(CASE WHEN m.size = 1 THEN (m.items -> 0)::text
                           ELSE json_build_object(
                               'schema_version', $21::text, 'deliveries', m.items
                           )::text END, 'UTF8'),
           m.priority
    FROM messages m
    JOIN batch b ON b.id = m.event_id
    CROSS JOIN handed
    ORDER BY m.first
    RETURNING id, exchange, routing_key, message_id, headers, body, priority,
              created_at
)
SELECT ARRAY(SELECT id FROM fresh) AS fresh,
       ARRAY(SELECT ROW(s.id, s.event_id, s.type, s.channel, s.status)
             FROM stored s) AS stored,
       ARRAY(SELECT ROW(q.id, q.exchange, q.routing_key, q.message_id,
                        q.headers::text, q.body, q.priority, q.created_at)
             FROM queued q) AS queued
"""
