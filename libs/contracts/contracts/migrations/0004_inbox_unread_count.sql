-- depends: 0003_outbox_hand_off
-- Each user's unread count, kept beside the user's inbox sequence, so that delivering
-- a notification or changing read state no longer counts every unread row the user
-- has: that cost grew with each notification a user left unread.
--
-- Triggers keep it, whichever code changes the rows. Every such change holds the
-- user's sequence row locked until it commits (a delivery takes it to number the
-- rows, a read-state change takes it first), so the count read under that lock is
-- exact, and the triggers' own updates of the row wait for nobody.
--
-- Running beside live gateways, of this release or the one before, it must make them
-- wait and never deadlock with them. Every transaction of theirs that writes to
-- notifications and touches inbox_sequences takes inbox_sequences first: a delivery
-- holds only row locks taken by SELECT ... FOR UPDATE on notifications (which this
-- migration's lock does not wait for) until it has upserted the sequence rows, and
-- a read-state change locks the sequence row before anything else. So this takes
-- inbox_sequences first too, then notifications, holding both to the commit.
LOCK TABLE inbox_sequences IN ACCESS EXCLUSIVE MODE;
LOCK TABLE notifications IN SHARE ROW EXCLUSIVE MODE;
ALTER TABLE inbox_sequences ADD COLUMN unread bigint NOT NULL DEFAULT 0;

CREATE FUNCTION inbox_unread_count() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta integer := 0;
    owner bigint;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        owner := OLD.user_id;
        IF OLD.inbox_seq IS NOT NULL AND OLD.read_at IS NULL
           AND OLD.archived_at IS NULL THEN
            delta := delta - 1;
        END IF;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        owner := NEW.user_id;
        IF NEW.inbox_seq IS NOT NULL AND NEW.read_at IS NULL
           AND NEW.archived_at IS NULL THEN
            delta := delta + 1;
        END IF;
    END IF;
    IF delta <> 0 THEN
        UPDATE inbox_sequences SET unread = unread + delta WHERE user_id = owner;
    END IF;
    RETURN NULL;
END;
$$;

-- The WHEN clauses keep the function from running for the many changes that do not
-- move the count (a status change of an email row, say).
CREATE TRIGGER inbox_unread_changed
    AFTER UPDATE OF inbox_seq, read_at, archived_at ON notifications
    FOR EACH ROW
    WHEN ((OLD.inbox_seq IS NOT NULL AND OLD.read_at IS NULL
           AND OLD.archived_at IS NULL)
          IS DISTINCT FROM
          (NEW.inbox_seq IS NOT NULL AND NEW.read_at IS NULL
           AND NEW.archived_at IS NULL))
    EXECUTE FUNCTION inbox_unread_count();

CREATE TRIGGER inbox_unread_inserted
    AFTER INSERT ON notifications
    FOR EACH ROW
    WHEN (NEW.inbox_seq IS NOT NULL AND NEW.read_at IS NULL
          AND NEW.archived_at IS NULL)
    EXECUTE FUNCTION inbox_unread_count();

CREATE TRIGGER inbox_unread_deleted
    AFTER DELETE ON notifications
    FOR EACH ROW
    WHEN (OLD.inbox_seq IS NOT NULL AND OLD.read_at IS NULL
          AND OLD.archived_at IS NULL)
    EXECUTE FUNCTION inbox_unread_count();

-- The counts so far. The lock taken above holds every change to notifications off
-- until the commit, so none can slip between this count and the triggers.
UPDATE inbox_sequences
SET unread = counted.unread
FROM (
    SELECT user_id, count(*) AS unread FROM notifications
    WHERE inbox_seq IS NOT NULL AND read_at IS NULL AND archived_at IS NULL
    GROUP BY user_id
) AS counted
WHERE inbox_sequences.user_id = counted.user_id;
