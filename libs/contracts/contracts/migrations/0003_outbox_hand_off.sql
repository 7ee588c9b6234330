-- depends: 0002_push_subscriptions
-- Rows a writer hands to the relay of its own process need no NOTIFY: that relay
-- publishes them at once, and waking every other relay for them is wasted work. Such
-- a writer marks its transaction with the setting notiflow.outbox_handoff.
CREATE OR REPLACE FUNCTION outbox_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('notiflow.outbox_handoff', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('notiflow_outbox', '');
    END IF;
    RETURN NULL;
END;
$$;
