-- Counts the counter updates of a batch. Every event about a batch carries
-- it, so a consumer that hears of one batch from several processes can
-- tell an older update from a newer one.
ALTER TABLE batches ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
