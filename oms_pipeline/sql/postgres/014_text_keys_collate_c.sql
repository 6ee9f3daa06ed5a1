-- Every text column that a btree index holds compares bytes (COLLATE "C"), whatever the
-- database's locale. Order numbers, external ids, member ids, owners, states and statuses are
-- identifiers, not words: nothing sorts them for a reader, and the SQLite store already compares
-- them byte by byte. Under a libc locale (Debian's default database locale is C.UTF-8) every
-- comparison in an index search or insert went through strcoll(): text comparisons were ~10%
-- of PostgreSQL's CPU in production_2x_no_checkpoints, index inserts ~40% (bench/RESULTS.md).
-- "C" also keeps these indexes valid across C library upgrades that change a locale's collation.
--
-- For ASCII identifiers C.UTF-8 and "C" give the same order, so what every query returns is
-- unchanged. Changing a column's collation rebuilds the indexes that hold it (the rows stay where
-- they are) under an exclusive lock on the table: on a large table, run it in a quiet hour.
ALTER TABLE orders
    ALTER COLUMN order_no TYPE text COLLATE "C",
    ALTER COLUMN parent_no TYPE text COLLATE "C",
    ALTER COLUMN owner TYPE text COLLATE "C",
    ALTER COLUMN state TYPE text COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C";
ALTER TABLE order_keys
    ALTER COLUMN source TYPE text COLLATE "C",
    ALTER COLUMN external_id TYPE text COLLATE "C",
    ALTER COLUMN member_id TYPE text COLLATE "C",
    ALTER COLUMN order_no TYPE text COLLATE "C";
ALTER TABLE stage_history ALTER COLUMN order_no TYPE text COLLATE "C";
ALTER TABLE order_events ALTER COLUMN order_no TYPE text COLLATE "C";
ALTER TABLE reverse_orders
    ALTER COLUMN reverse_no TYPE text COLLATE "C",
    ALTER COLUMN order_no TYPE text COLLATE "C",
    ALTER COLUMN request_key TYPE text COLLATE "C",
    ALTER COLUMN state TYPE text COLLATE "C";
ALTER TABLE instances ALTER COLUMN holder TYPE text COLLATE "C";
ALTER TABLE sequences ALTER COLUMN name TYPE text COLLATE "C";
