-- Stage boundaries passed without a checkpoint of their own (a stage's checkpoint = false) go
-- with the order's next checkpoint: packed into that checkpoint's history row, a JSON array of
-- [stage, outcome, reason, at], oldest first, listed before the row's own entry.
ALTER TABLE stage_history ADD COLUMN trail bytea;
