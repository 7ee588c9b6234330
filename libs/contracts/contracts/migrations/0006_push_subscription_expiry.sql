-- depends: 0005_pending_republish
-- What the push sender needs to keep a user's subscriptions few and alive:
-- when the browser says the subscription expires (PushSubscription's
-- expirationTime; null when it does not say), and when the same browser last
-- posted it again, which with created_at tells which of a user's browsers
-- subscribed least recently. Both are nullable without a default, so adding
-- them changes no row.
ALTER TABLE push_subscriptions
    ADD COLUMN expires_at timestamptz,
    ADD COLUMN refreshed_at timestamptz;
