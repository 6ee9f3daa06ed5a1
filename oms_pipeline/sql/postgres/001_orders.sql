-- Orders, their progress and history: the production (PostgreSQL) store.
-- The same model as sql/sqlite/001-003, in PostgreSQL terms.
--
-- doc is bytea, not jsonb: the store never looks inside the document (member
-- and status, the only things searched on, are columns), so jsonb would cost
-- a parse and a re-encode per write (PostgreSQL CPU is the limit at ~7-10 us
-- per checkpoint row, PERF_NOTES), would not give back the exact bytes
-- written (jsonb normalises spacing and key order) and would need a binary
-- codec on every pool connection (PITFALLS 8). bytea goes through COPY too.
--
-- fillfactor = 50: a checkpoint rewrites the row at every stage boundary;
-- leaving half of each page free lets most of those updates be HOT (same
-- page, no index entries written) as long as no indexed column changes, and
-- most boundaries change only stage, attempts, doc and updated_at.
--
-- Scale-out (documentation, not applied). Seed 002 shards orders by
-- "order number mod 1024". In PostgreSQL terms: hash partitioning on
-- order_no, with stage_history and order_events partitioned by the same key
-- and the same modulus, so an order's row, its history and its outbox events
-- sit in partitions with the same remainder (one checkpoint touches one
-- partition triple; partition-wise joins; a partition set can move to
-- another node as a unit):
--
--   CREATE TABLE orders (... as below ...) PARTITION BY HASH (order_no);
--   CREATE TABLE orders_p0000 PARTITION OF orders
--       FOR VALUES WITH (MODULUS 1024, REMAINDER 0) WITH (fillfactor = 50);
--   ... one per remainder (generated), and likewise
--   CREATE TABLE stage_history (...) PARTITION BY HASH (order_no);   -- PK (order_no, id)
--   CREATE TABLE order_events  (...) PARTITION BY HASH (order_no);   -- PK (order_no, id)
--
-- Split children have order numbers of their own, so they hash elsewhere;
-- to keep a family together, partition instead on a root_no column
-- (coalesce(parent_no, order_no)) with PRIMARY KEY (root_no, order_no) and
-- carry root_no in every look-up, at the price of a wider key everywhere.
-- A unique index on a partitioned table must contain the partition key, so
-- UNIQUE (source, external_id) can no longer be enforced on orders: intake
-- idempotency moves to a small table (source, external_id) -> order_no,
-- hash-partitioned on (source, external_id) and written in the same
-- transaction. Look-ups by member, status or state fan out to every
-- partition: serve those from a replica or a search index at that scale.
CREATE TABLE orders (
    order_no    text PRIMARY KEY,
    source      text NOT NULL,
    external_id text NOT NULL,
    kind        text NOT NULL,
    state       text NOT NULL,              -- runtime state: queued, parked, wait_pay, done, ...
    stage       text NOT NULL,              -- the stage to run next, or the terminal reached
    status      text NOT NULL,              -- business status (states.py)
    attempts    integer NOT NULL DEFAULT 0,
    wake_at     double precision,           -- unix seconds, like every time in the store
    parent_no   text,
    member_id   text NOT NULL DEFAULT '',
    doc         bytea NOT NULL,             -- the order document (msgspec JSON), exactly as written
    created_at  double precision NOT NULL,
    updated_at  double precision NOT NULL,
    UNIQUE (source, external_id)            -- intake is idempotent on (source, external id)
) WITH (fillfactor = 50);
CREATE INDEX orders_by_state ON orders (state, order_no);
CREATE INDEX orders_by_parent ON orders (parent_no) WHERE parent_no IS NOT NULL;
CREATE INDEX orders_by_member ON orders (member_id, order_no);
CREATE INDEX orders_by_status ON orders (status, order_no);

-- Append-only; `id` keeps the order in which an order's entries were written.
CREATE TABLE stage_history (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_no text NOT NULL,
    stage    text NOT NULL,
    outcome  text NOT NULL,
    reason   text NOT NULL,
    at       double precision NOT NULL
);
CREATE INDEX stage_history_by_order ON stage_history (order_no, id);

-- Blocks of numbers (order numbers): one row per sequence, reserved a block at a time.
CREATE TABLE sequences (
    name text PRIMARY KEY,
    next bigint NOT NULL
);
