DROP TABLE IF EXISTS comment_pace;
