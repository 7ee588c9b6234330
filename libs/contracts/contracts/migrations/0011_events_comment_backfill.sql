-- depends: 0010_comment_pace
-- Events stored before 0008 name their comment only in their payload. Whatever
-- looks for a comment's event by events.comment_id (the dispatcher, before it
-- notifies anyone; `notiflow-admin redispatch`, to find comments never
-- dispatched) took such a comment for one that never had an event, and notified
-- its people a second time. Each comment's earliest such event now carries it,
-- unless an event of it carries it already; the others stay as they were, for the
-- unique index allows one event per comment.
UPDATE events AS e
SET comment_id = earliest.comment_id
FROM (
    SELECT DISTINCT ON ((payload->>'comment_id')::bigint)
        id, (payload->>'comment_id')::bigint AS comment_id
    FROM events
    WHERE comment_id IS NULL
      AND type = 'comment.created'
      AND payload->>'comment_id' ~ '^[1-9][0-9]{0,17}$'
    ORDER BY (payload->>'comment_id')::bigint, received_at, id
) AS earliest
WHERE e.id = earliest.id
  AND NOT EXISTS (
      SELECT FROM events AS other WHERE other.comment_id = earliest.comment_id
  );
