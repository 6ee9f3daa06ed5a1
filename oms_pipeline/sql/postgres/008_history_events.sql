-- The status changes a checkpoint makes are packed into its stage_history row, a JSON array of
-- [from, to, at], oldest first, instead of a row each in order_events (a heap row and two index
-- entries fewer per change, ~3 per order). order_events keeps what was written before this
-- migration, and reads list those first.
ALTER TABLE stage_history ADD COLUMN events bytea;
