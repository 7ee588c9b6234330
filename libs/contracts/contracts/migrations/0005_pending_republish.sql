-- depends: 0004_inbox_unread_count
-- transactional: false
-- A notification left pending by a lost message (the delivery queues are classic and
-- not replicated) has its delivery published again by the lease sweepers. They
-- record when on the row, so that a row still waiting in a long backlog gets at most
-- one more message per period, and find such rows through the index below.
--
-- The steps run one by one, outside a transaction, so that the index is built
-- CONCURRENTLY: a plain CREATE INDEX would hold off every write to notifications
-- while it reads the whole table. Adding a nullable column without a default
-- changes no row and takes its lock only for a moment. A build cut short (its
-- connection lost, the run killed) leaves the column and the index behind, the
-- index invalid or even complete, and the migration unrecorded: the run that
-- applies it again keeps the column and builds the index anew.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS republished_at timestamptz;

DROP INDEX CONCURRENTLY IF EXISTS notifications_pending_idx;

CREATE INDEX CONCURRENTLY notifications_pending_idx
    ON notifications (type, greatest(updated_at, republished_at))
    WHERE status = 'pending';
