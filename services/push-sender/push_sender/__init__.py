"""The push sender: Web Push subscriptions, and delivery of push notifications."""
