DROP INDEX CONCURRENTLY notifications_pending_idx;
ALTER TABLE notifications DROP COLUMN republished_at;
