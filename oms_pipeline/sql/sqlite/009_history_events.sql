-- The status changes a checkpoint makes are packed into its stage_history row, a JSON array of
-- [from, to, at], oldest first, instead of a row each in order_events: one row fewer per change.
-- order_events keeps what was written before this migration, and reads list those first.
ALTER TABLE stage_history ADD COLUMN events BLOB
