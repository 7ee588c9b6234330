-- depends: 0001_initial
-- Web Push subscriptions (owned by the push sender): one row per browser that
-- agreed to receive pushes. The endpoint names the browser at its push service, so
-- it is unique; a browser that subscribes again, even for another user, replaces
-- its row.

CREATE TABLE push_subscriptions (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    endpoint        text NOT NULL UNIQUE,
    p256dh          text NOT NULL,
    auth            text NOT NULL,
    user_agent      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_success_at timestamptz
);
CREATE INDEX push_subscriptions_user_idx ON push_subscriptions (user_id);
