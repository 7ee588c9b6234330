-- depends: 0007_idempotency_key_age
-- transactional: false
-- A comment is dispatched once, whatever event names it: an event about a comment
-- that another event, under another id, was dispatched for (a message edited and
-- published again by hand, say) must notify nobody a second time. The dispatcher
-- writes each event's comment here; the unique index finds such events, and turns
-- away the second of two stored at the same moment. Events stored before this
-- migration have none, so that a database already holding such events migrates.
--
-- The steps run one by one, outside a transaction, so that the index is built
-- CONCURRENTLY while dispatchers go on storing events. Adding a nullable column
-- without a default changes no row. A build cut short leaves the column and the
-- index behind, and the run that applies the migration again drops the index first.
ALTER TABLE events ADD COLUMN IF NOT EXISTS comment_id bigint;

DROP INDEX CONCURRENTLY IF EXISTS events_comment_id_key;

CREATE UNIQUE INDEX CONCURRENTLY events_comment_id_key ON events (comment_id);
