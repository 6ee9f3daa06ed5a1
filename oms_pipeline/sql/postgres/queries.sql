-- Named queries of the PostgreSQL store (oms_pipeline/adapters/postgres_store.py).
-- Writes are set-based: one statement per kind of row for a whole group
-- commit, the rows passed as parallel arrays and expanded with unnest (the
-- store sends each text[] of these as one joined string instead, rewriting
-- the statement when it loads it: postgres_store.JOINED). The
-- append-only rows (stage history with its packed status changes, outbox) go
-- by COPY instead (postgres_store.APPENDS).

-- name: migration_lock
-- Held until the end of the migration's transaction: two instances starting
-- at once apply each migration once, one after the other.
SELECT pg_advisory_xact_lock(hashtext('oms-pipeline schema_migrations'));

-- name: ensure_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migration_applied
SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1);

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES ($1, $2);

-- name: schema_state
SELECT current_database(), to_regclass('schema_migrations') IS NOT NULL;

-- name: applied_migrations
SELECT version FROM schema_migrations ORDER BY version;

-- name: create_orders
-- New orders and split children. Intake is idempotent on (source, external_id), held by
-- order_keys (migration 012): a known pair inserts nothing and is absent from RETURNING, and
-- a replayed split stores no second set of children (their keys repeat). The orders insert
-- has no ON CONFLICT of its own: only new pairs reach it, so an order number already taken
-- is a fault (two instances with one instance id) that must fail the batch loudly, where
-- DO NOTHING would answer the new order with the other order's number. It is also cheaper:
-- no speculative insertion (bench/RESULTS.md).
WITH n AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::bytea[], $10::float8[], $11::text[], $12::float8[])
        AS n(order_no, source, external_id, kind, state, stage, status, parent_no, doc, at, member_id, wake_at)
), k AS (
    INSERT INTO order_keys (source, external_id, order_no, member_id)
    SELECT n.source, n.external_id, n.order_no, n.member_id FROM n
    ON CONFLICT DO NOTHING
    RETURNING order_no
)
INSERT INTO orders (order_no, source, external_id, kind, state, stage, status, attempts, wake_at,
                    parent_no, doc, created_at, updated_at, member_id, owner)
SELECT n.order_no, n.source, n.external_id, n.kind, n.state, n.stage, n.status, 0, n.wake_at,
       n.parent_no, n.doc, n.at, n.at, n.member_id, $13::text
FROM n JOIN k USING (order_no)
RETURNING order_no;

-- name: orders_by_external
SELECT k.source, k.external_id, k.order_no
FROM unnest($1::text[], $2::text[]) AS q(source, external_id)
JOIN order_keys k ON k.source = q.source AND k.external_id = q.external_id;

-- name: checkpoint_orders
-- One row per order (the caller keeps the last record of the batch), sorted
-- by order number so concurrent writers lock rows in the same order.
-- With a holder ($9), an order another holder owns is left alone (the caller finds which).
UPDATE orders AS o
SET state = c.state, stage = c.stage, status = c.status, attempts = c.attempts,
    wake_at = c.wake_at, doc = c.doc, updated_at = c.at, owner = $9::text
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::float8[],
            $7::bytea[], $8::float8[])
     AS c(order_no, state, stage, status, attempts, wake_at, doc, at)
WHERE o.order_no = c.order_no AND ($9::text = '' OR o.owner IN ('', $9::text));

-- name: owned_elsewhere
SELECT order_no FROM orders WHERE order_no = ANY ($1::text[]) AND owner NOT IN ('', $2);

-- name: claim
UPDATE orders SET owner = $2 WHERE order_no = $1 AND state = $3 RETURNING order_no;

-- name: renew
INSERT INTO instances (holder, alive_until) VALUES ($1, $2)
ON CONFLICT (holder) DO UPDATE SET alive_until = excluded.alive_until;

-- name: take_over
-- Queued orders of owners whose liveness has lapsed (or who never had any). The owners of queued
-- orders are found first, one index probe each (a skip scan of orders_by_owner: there are as many
-- as instances), then only the lapsed ones' orders are read: every instance runs this every
-- lease / 3, and reading every queued order of the live instances (a sequential scan of the
-- table) cost 100 ms a time with a few thousand orders in flight.
WITH RECURSIVE owners AS (
    (SELECT owner FROM orders WHERE state = 'queued' AND owner > '' ORDER BY owner LIMIT 1)
    UNION ALL
    SELECT (SELECT o.owner FROM orders o WHERE o.state = 'queued' AND o.owner > w.owner
            ORDER BY o.owner LIMIT 1)
    FROM owners w WHERE w.owner IS NOT NULL)
UPDATE orders SET owner = $1
WHERE order_no IN (SELECT o.order_no FROM orders o
                   WHERE o.state = 'queued'
                     AND o.owner IN (SELECT w.owner FROM owners w LEFT JOIN instances i ON i.holder = w.owner
                                     WHERE w.owner IS NOT NULL AND w.owner <> $1
                                       AND (i.alive_until IS NULL OR i.alive_until < $2))
                   ORDER BY o.order_no LIMIT $3 FOR UPDATE OF o SKIP LOCKED)
RETURNING order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at;

-- name: checkpoint_if_orders
-- Compare-and-set checkpoints of a group commit, at most one per order (the
-- caller runs an order's second one in a later statement of the same
-- transaction), sorted by order number: each applies only if its order is still
-- in its expected state ($9), and takes the order over for the holder ($10).
UPDATE orders AS o
SET state = c.state, stage = c.stage, status = c.status, attempts = c.attempts,
    wake_at = c.wake_at, doc = c.doc, updated_at = c.at, owner = $10::text
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::float8[],
            $7::bytea[], $8::float8[], $9::text[])
     AS c(order_no, state, stage, status, attempts, wake_at, doc, at, expect)
WHERE o.order_no = c.order_no AND o.state = c.expect
RETURNING o.order_no;

-- name: next_block
-- $2 is the block size + 1; returns the number after the block.
INSERT INTO sequences (name, next) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET next = sequences.next + excluded.next - 1
RETURNING next;

-- name: get_orders
-- The orders asked for in one turn of the daemon's loop, read together.
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE order_no = ANY ($1::text[]);

-- name: active_orders
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE state IN ('queued', 'parked', 'wait_pay') AND (state <> 'queued' OR owner IN ('', $1))
ORDER BY created_at, order_no;

-- name: orders_in_state
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE state = $1 AND order_no > $2 ORDER BY order_no LIMIT $3;

-- name: children
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE parent_no = $1 ORDER BY order_no;

-- name: order_history
SELECT order_no, stage, outcome, reason, at, trail FROM stage_history WHERE order_no = $1 ORDER BY id;

-- name: counts
SELECT state, count(*) FROM orders GROUP BY state;

-- name: order_events
-- Status changes: those written before migration 008 (a row each), then those packed in history
-- rows (from_status, to_status and at NULL, `events` the packed array).
SELECT from_status, to_status, at, events FROM (
    SELECT 0 AS part, id, from_status, to_status, at, NULL::bytea AS events FROM order_events WHERE order_no = $1
    UNION ALL
    SELECT 1, id, NULL, NULL, NULL, events FROM stage_history WHERE order_no = $1 AND events IS NOT NULL) AS e
ORDER BY part, id;

-- name: custom_plans
-- For search_orders and orders_in_state: a generic plan cannot know which of
-- the optional filters are set, nor whether a partial index covers the state
-- or statuses asked for, so it could not pick the member, state or status index.
SET LOCAL plan_cache_mode = force_custom_plan;

-- name: search_orders
-- Filters left empty ('' / no statuses) match everything; paging is by order number.
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders
WHERE ($1::text = '' OR order_no IN (SELECT k.order_no FROM order_keys k
                                     WHERE k.member_id = $1::text AND k.order_no > $4))
  AND (cardinality($2::text[]) = 0 OR status = ANY ($2::text[]))
  AND ($3::text = '' OR state = $3::text)
  AND order_no > $4
ORDER BY order_no LIMIT $5;

-- name: outbox_claim
-- Unpublished rows not claimed by another relay since $3 (its lease); SKIP
-- LOCKED lets relays of several instances claim side by side.
UPDATE outbox SET claimed_by = $1, claimed_at = $2
WHERE id IN (SELECT id FROM outbox
             WHERE published_at IS NULL AND (claimed_by IS NULL OR claimed_by = $1 OR claimed_at < $3)
             ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)
RETURNING id, order_no, topic, key, payload, at;

-- name: outbox_done
-- Published rows leave the outbox: a delete writes no new row version and no index entry, where
-- marking them (published_at) wrote both (PostgreSQL ~8% less CPU on production_2x_no_checkpoints).
-- Rows an earlier version marked published stay until an operator deletes them. $2: the handed
-- batches (migration 013) whose every row is published.
WITH batches AS (DELETE FROM outbox_batches WHERE first_id = ANY ($2::bigint[]))
DELETE FROM outbox WHERE id = ANY ($1::bigint[]);

-- name: outbox_pending
SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL)
     + (SELECT coalesce(sum(size), 0) FROM outbox_batches);

-- name: outbox_batch_insert
INSERT INTO outbox_batches (first_id, claimed_by, claimed_at, size, rows) VALUES ($1, $2, $3, $4, $5);

-- name: outbox_batches_lapsed
-- Handed batches whose claim lapsed before $1, taken out to be written back as ordinary rows.
DELETE FROM outbox_batches
WHERE first_id IN (SELECT first_id FROM outbox_batches WHERE claimed_at < $1
                   ORDER BY first_id LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING first_id, rows;

-- name: reverse_insert
INSERT INTO reverse_orders (reverse_no, order_no, request_key, kind, state, created_at, updated_at, doc)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT DO NOTHING  -- the number derives from (order_no, request_key): either key
RETURNING reverse_no;

-- name: reverse_upsert
INSERT INTO reverse_orders (reverse_no, order_no, request_key, kind, state, created_at, updated_at, doc)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (reverse_no) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at,
                                       doc = excluded.doc;

-- name: reverse_by_key
SELECT reverse_no FROM reverse_orders WHERE order_no = $1 AND request_key = $2;

-- name: reverse_get
SELECT reverse_no, order_no, request_key, kind, state, created_at, updated_at, doc
FROM reverse_orders WHERE reverse_no = $1;

-- name: reverse_of
SELECT reverse_no, order_no, request_key, kind, state, created_at, updated_at, doc
FROM reverse_orders WHERE order_no = $1 ORDER BY created_at, reverse_no;

-- name: reverse_open
SELECT reverse_no, order_no, request_key, kind, state, created_at, updated_at, doc
FROM reverse_orders WHERE state NOT IN ('done', 'refused') AND reverse_no > $1 ORDER BY reverse_no LIMIT $2;

-- name: stranded
-- Queued orders of this holder (or nobody) not written since $2 (orders_by_owner): restarted by the
-- sweeper when its instance is not working on them.
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE state = 'queued' AND owner IN ('', $1) AND updated_at < $2 AND order_no > $3
ORDER BY order_no LIMIT $4;

-- name: overdue
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE state IN ('parked', 'wait_pay') AND wake_at < $1 ORDER BY wake_at LIMIT $2;

-- name: outbox_ids
-- Ids for outbox rows handed to the relay in memory (written with them, claimed by it), from the
-- identity column's own sequence. Named as a constant: pg_get_serial_sequence() would look the
-- sequence up again for every id (10 us an id against 0.7).
SELECT nextval('outbox_id_seq') FROM generate_series(1, $1);
