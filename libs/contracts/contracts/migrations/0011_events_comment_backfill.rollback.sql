-- The comments filled in are those the events name, which every release reads
-- alike; rolling back leaves them, as 0008's rollback drops the column itself.
DO $$ BEGIN END $$;
