-- depends: 0006_push_subscription_expiry
-- transactional: false
-- The comments service forgets Idempotency-Keys once they are older than
-- NOTIFLOW_IDEMPOTENCY_KEY_HOURS, oldest first, and finds them through this index.
-- Built CONCURRENTLY, outside a transaction, so that requests storing keys go on
-- while it reads the table. A build cut short (its connection lost, the run
-- killed) leaves the index behind, invalid or even complete, and the migration
-- unrecorded: the run that applies it again drops it first.
DROP INDEX CONCURRENTLY IF EXISTS idempotency_keys_created_idx;

CREATE INDEX CONCURRENTLY idempotency_keys_created_idx
    ON idempotency_keys (created_at);
