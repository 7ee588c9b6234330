-- The first schema: people and their threads (owned by the comments service),
-- events and notifications (owned by the dispatcher and the senders), and the
-- outbox every writer publishes through.

CREATE TABLE users (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username     text NOT NULL UNIQUE CHECK (username ~ '^[a-z0-9_]{1,32}$'),
    email        text,
    display_name text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE posts (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    author_id  bigint NOT NULL REFERENCES users (id),
    title      text NOT NULL,
    body       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE comments (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    post_id    bigint NOT NULL REFERENCES posts (id),
    author_id  bigint NOT NULL REFERENCES users (id),
    body       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX comments_post_idx ON comments (post_id, id);

-- A request replayed with the same Idempotency-Key gets the stored response.
CREATE TABLE idempotency_keys (
    user_id       bigint NOT NULL REFERENCES users (id),
    key           text NOT NULL,
    request_hash  text NOT NULL,
    status_code   smallint NOT NULL,
    response      jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

-- Messages waiting to be published. A writer inserts here in the same transaction
-- as its business rows; the relay publishes with confirms and then deletes.
CREATE TABLE outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exchange    text NOT NULL,
    routing_key text NOT NULL,
    message_id  text NOT NULL,
    headers     jsonb NOT NULL DEFAULT '{}',
    body        bytea NOT NULL,
    priority    smallint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION outbox_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notiflow_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_wake AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_wake();

CREATE TABLE events (
    id          uuid PRIMARY KEY,
    type        text NOT NULL,
    payload     jsonb NOT NULL,
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notification_preferences (
    user_id bigint NOT NULL REFERENCES users (id),
    type    text NOT NULL CHECK (type IN ('email', 'sse', 'push')),
    enabled boolean NOT NULL,
    PRIMARY KEY (user_id, type)
);

-- One row per (event, recipient, channel type). Status moves only by conditional
-- UPDATEs: pending -> sending -> sent; sending -> retrying -> sending;
-- -> failed; pending -> skipped.
CREATE TABLE notifications (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         uuid NOT NULL REFERENCES events (id),
    user_id          bigint NOT NULL REFERENCES users (id),
    email            text,
    title            text NOT NULL,
    message          text NOT NULL,
    type             text NOT NULL CHECK (type IN ('email', 'sse', 'push')),
    channel          text NOT NULL,
    priority         smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    metadata         jsonb NOT NULL DEFAULT '{}',
    status           text NOT NULL DEFAULT 'pending' CHECK (
        status IN ('pending', 'sending', 'retrying', 'sent', 'failed', 'skipped')
    ),
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text,
    next_attempt_at  timestamptz,
    lease_expires_at timestamptz,
    inbox_seq        bigint,
    read_at          timestamptz,
    archived_at      timestamptz,
    event_occurred_at timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz,
    UNIQUE (event_id, user_id, type)
);
CREATE UNIQUE INDEX notifications_inbox_idx
    ON notifications (user_id, inbox_seq) WHERE inbox_seq IS NOT NULL;
CREATE INDEX notifications_unread_idx
    ON notifications (user_id) WHERE inbox_seq IS NOT NULL AND read_at IS NULL
    AND archived_at IS NULL;
CREATE INDEX notifications_status_idx
    ON notifications (status, updated_at) WHERE status IN ('sending', 'retrying');

-- The last in-app sequence number handed out per user. Taking the next number locks
-- the user's row until commit, so a user's sequence numbers are in commit order.
CREATE TABLE inbox_sequences (
    user_id  bigint PRIMARY KEY REFERENCES users (id),
    last_seq bigint NOT NULL
);
