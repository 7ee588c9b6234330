DROP TRIGGER inbox_unread_deleted ON notifications;
DROP TRIGGER inbox_unread_inserted ON notifications;
DROP TRIGGER inbox_unread_changed ON notifications;
DROP FUNCTION inbox_unread_count();
ALTER TABLE inbox_sequences DROP COLUMN unread;
