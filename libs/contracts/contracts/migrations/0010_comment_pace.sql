-- depends: 0009_events_comment_from_older_dispatchers
-- How fast each user may comment (NOTIFLOW_COMMENTS_PER_MINUTE). One row per user
-- who has commented while the limit was on: the time by which the user's
-- allowance would be whole again if they posted no more. Each comment pushes it
-- on by one interval (a minute divided by the limit), from now if it lies in the
-- past; a comment that would push it more than a minute ahead is refused. So a
-- user posts up to the limit at once, then one comment per interval.
--
-- A row, not a count of recent comments: the comments service updates it in the
-- statement that inserts the comment, which waits for any other writer of the
-- same user's row and then judges by that writer's committed value, so two
-- requests at once can never both take the last comment of a minute.
CREATE TABLE comment_pace (
    user_id     bigint PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    paced_until timestamptz NOT NULL
);
