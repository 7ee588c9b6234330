-- depends: 0006_push_subscription_expiry
-- transactional: false
-- The comments service forgets Idempotency-Keys once they are older than
-- NOTIFLOW_IDEMPOTENCY_KEY_HOURS, oldest first, and finds them through this index.
-- Built CONCURRENTLY, outside a transaction, so that requests storing keys go on
-- while it reads the table. Should the build fail, the rollback drops the
-- half-built index, and the migration can be applied again.
CREATE INDEX CONCURRENTLY idempotency_keys_created_idx
    ON idempotency_keys (created_at);
