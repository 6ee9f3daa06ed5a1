-- Outbox rows handed to the relay in memory (ports/store.py OutboxHandoff) are written one row
-- per group commit here instead of one row each in the outbox: a commit's ~100 events and
-- commands cost one insert and, once the relay has published them all, one delete, where
-- they cost ~100 inserts with two index entries each and ~100 deletes (the outbox was ~38% of
-- PostgreSQL's row operations in production_2x_no_checkpoints, bench/RESULTS.md).
-- Each row keeps its own outbox id (from outbox_id_seq), so message ids do not change.
-- A batch whose claim has lapsed (its relay died, or gave up on one of its rows) is moved
-- into the outbox as ordinary unclaimed rows by the next claim pass, and claimed from there.
-- An instance of an earlier version neither writes nor looks at this table: while versions are
-- mixed, a lapsed batch waits for an instance of this version (or later) to write it back.
CREATE TABLE outbox_batches (
    first_id    bigint PRIMARY KEY,         -- the outbox id of its first row
    claimed_by  text NOT NULL,              -- the relay it was handed to
    claimed_at  double precision NOT NULL,
    size        integer NOT NULL,           -- rows in it
    rows        bytea NOT NULL              -- msgpack: [[id, order_no, topic, key, payload, at], ...]
);
-- Written once and deleted: compressing it would cost more CPU than the pages it saves.
ALTER TABLE outbox_batches ALTER COLUMN rows SET STORAGE EXTERNAL;
