DROP TRIGGER IF EXISTS events_comment_id ON events;
DROP FUNCTION IF EXISTS events_comment_id();
