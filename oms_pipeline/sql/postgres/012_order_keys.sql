-- Intake idempotency and the look-up by member move off the orders row to a write-once table,
-- order_keys: (source, external_id) -> order_no, with the member. An order row is rewritten at
-- each of its checkpoints, and a rewrite that changes the state (nearly all of them: queued ->
-- split, queued -> done) cannot be HOT, so it took a new entry in every index of the row: the
-- unique (source, external_id) index (with its uniqueness check) and the member index were
-- ~45% of such an update's PostgreSQL CPU (bench/RESULTS.md). order_keys is written once, in
-- the same statement and transaction as the order row, and never updated.
--
-- It is also the table that 001's scale-out notes call for: a partitioned orders table cannot
-- hold a unique index without the partition key, so at that scale order_keys is partitioned on
-- (source, external_id) on its own.
CREATE TABLE order_keys (
    source      text NOT NULL,
    external_id text NOT NULL,
    order_no    text NOT NULL,
    member_id   text NOT NULL DEFAULT '',
    PRIMARY KEY (source, external_id)
);
INSERT INTO order_keys (source, external_id, order_no, member_id)
SELECT source, external_id, order_no, member_id FROM orders;
CREATE INDEX order_keys_by_member ON order_keys (member_id, order_no);
ALTER TABLE orders DROP CONSTRAINT orders_source_external_id_key;
DROP INDEX orders_by_member;
