"""The comments service: users, posts and comments, and the CommentCreated event."""
