-- name: create_order
INSERT INTO orders (order_no, source, external_id, kind, state, stage, status, attempts, wake_at,
                    parent_no, doc, created_at, updated_at, member_id, owner)
VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (source, external_id) DO NOTHING;

-- name: order_no_by_external
SELECT order_no FROM orders WHERE source = ? AND external_id = ?;

-- name: checkpoint
UPDATE orders SET state = ?, stage = ?, status = ?, attempts = ?, wake_at = ?, doc = ?, updated_at = ?,
                  owner = ?
WHERE order_no = ?;

-- name: checkpoint_if
UPDATE orders SET state = ?, stage = ?, status = ?, attempts = ?, wake_at = ?, doc = ?, updated_at = ?,
                  owner = ?
WHERE order_no = ? AND state = ?;

-- name: owned_elsewhere
-- Of the given orders (a JSON array), those another holder owns.
SELECT order_no FROM orders WHERE order_no IN (SELECT value FROM json_each(?1)) AND owner NOT IN ('', ?2);

-- name: claim
UPDATE orders SET owner = ? WHERE order_no = ? AND state = ?;

-- name: renew
INSERT INTO instances (holder, alive_until) VALUES (?, ?)
ON CONFLICT (holder) DO UPDATE SET alive_until = excluded.alive_until;

-- name: take_over
-- Queued orders of owners whose liveness has lapsed (or who never had any).
UPDATE orders SET owner = ?1
WHERE order_no IN (SELECT o.order_no FROM orders o LEFT JOIN instances i ON i.holder = o.owner
                   WHERE o.state = 'queued' AND o.owner NOT IN ('', ?1)
                     AND (i.alive_until IS NULL OR i.alive_until < ?2)
                   ORDER BY o.order_no LIMIT ?3)
RETURNING order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at;

-- name: history
INSERT INTO stage_history (order_no, stage, outcome, reason, at, trail, events) VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: next_block
INSERT INTO sequences (name, next) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET next = next + excluded.next - 1
RETURNING next;

-- name: order_by_external
SELECT order_no FROM orders WHERE source = ? AND external_id = ?;

-- name: get_order
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE order_no = ?;

-- name: active_orders
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE state IN ('queued', 'parked', 'wait_pay') AND (state <> 'queued' OR owner IN ('', ?))
ORDER BY created_at;

-- name: orders_in_state
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE state = ? AND order_no > ? ORDER BY order_no LIMIT ?;

-- name: children
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE parent_no = ? ORDER BY order_no;

-- name: order_history
SELECT order_no, stage, outcome, reason, at, trail FROM stage_history WHERE order_no = ? ORDER BY rowid;

-- name: counts
SELECT state, count(*) FROM orders GROUP BY state;

-- name: order_events
-- Status changes: those written before migration 009 (a row each), then those packed in history
-- rows (from_status, to_status and at NULL, `events` the packed array).
SELECT from_status, to_status, at, events FROM (
    SELECT 0 AS part, id AS n, from_status, to_status, at, NULL AS events FROM order_events WHERE order_no = ?1
    UNION ALL
    SELECT 1, rowid, NULL, NULL, NULL, events FROM stage_history WHERE order_no = ?1 AND events IS NOT NULL)
ORDER BY part, n;

-- name: search_orders
-- Filters left empty ('' / '[]') match everything; paging is by order number.
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders
WHERE (?1 = '' OR member_id = ?1)
  AND (?2 = '[]' OR status IN (SELECT value FROM json_each(?2)))
  AND (?3 = '' OR state = ?3)
  AND order_no > ?4
ORDER BY order_no LIMIT ?5;

-- name: add_outbox
INSERT INTO outbox (order_no, topic, key, payload, at) VALUES (?, ?, ?, ?, ?);

-- name: outbox_claim
-- Rows unpublished and not claimed by another relay since ?3 (its lease).
UPDATE outbox SET claimed_by = ?1, claimed_at = ?2
WHERE id IN (SELECT id FROM outbox
             WHERE published_at IS NULL AND (claimed_by IS NULL OR claimed_by = ?1 OR claimed_at < ?3)
             ORDER BY id LIMIT ?4)
RETURNING id, order_no, topic, key, payload, at;

-- name: outbox_done
-- Published rows leave the outbox (as on PostgreSQL).
DELETE FROM outbox WHERE id = ?;

-- name: outbox_pending
SELECT count(*) FROM outbox WHERE published_at IS NULL;

-- name: reverse_insert
INSERT INTO reverse_orders (reverse_no, order_no, request_key, kind, state, created_at, updated_at, doc)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING  -- the number derives from (order_no, request_key): either key;

-- name: reverse_upsert
INSERT INTO reverse_orders (reverse_no, order_no, request_key, kind, state, created_at, updated_at, doc)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (reverse_no) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at,
                                       doc = excluded.doc;

-- name: reverse_by_key
SELECT reverse_no FROM reverse_orders WHERE order_no = ? AND request_key = ?;

-- name: reverse_get
SELECT reverse_no, order_no, request_key, kind, state, created_at, updated_at, doc
FROM reverse_orders WHERE reverse_no = ?;

-- name: reverse_of
SELECT reverse_no, order_no, request_key, kind, state, created_at, updated_at, doc
FROM reverse_orders WHERE order_no = ? ORDER BY created_at, reverse_no;

-- name: reverse_open
SELECT reverse_no, order_no, request_key, kind, state, created_at, updated_at, doc
FROM reverse_orders WHERE state NOT IN ('done', 'refused') AND reverse_no > ? ORDER BY reverse_no LIMIT ?;

-- name: stranded
-- Queued orders of this holder (or nobody) not written since ? (orders_by_owner): restarted by the
-- sweeper when its instance is not working on them.
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE state = 'queued' AND owner IN ('', ?) AND updated_at < ? AND order_no > ?
ORDER BY order_no LIMIT ?;

-- name: overdue
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE state IN ('parked', 'wait_pay') AND wake_at < ? ORDER BY wake_at LIMIT ?;
