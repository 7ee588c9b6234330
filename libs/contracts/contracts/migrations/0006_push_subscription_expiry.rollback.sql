ALTER TABLE push_subscriptions DROP COLUMN expires_at, DROP COLUMN refreshed_at;
