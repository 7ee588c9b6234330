-- depends: 0008_events_by_comment
-- During a rolling upgrade, dispatchers of the release before 0008 go on storing
-- events after it is applied, and they do not write comment_id: each such comment
-- could be notified again by an event under another id. The trigger writes it for
-- them, from the event itself. A dispatcher of this release writes it already, and
-- the trigger's condition, checked before any function runs, lets its rows by.
CREATE FUNCTION events_comment_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.comment_id := (NEW.payload->>'comment_id')::bigint;
    RETURN NEW;
END;
$$;

CREATE TRIGGER events_comment_id
    BEFORE INSERT ON events
    FOR EACH ROW
    WHEN (NEW.comment_id IS NULL AND NEW.type = 'comment.created')
    EXECUTE FUNCTION events_comment_id();
