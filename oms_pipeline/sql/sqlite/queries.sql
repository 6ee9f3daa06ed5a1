-- name: create_order
INSERT INTO orders (order_no, source, external_id, kind, state, stage, status, attempts, wake_at,
                    parent_no, doc, created_at, updated_at, member_id)
VALUES (?, ?, ?, ?, ?, ?, ?, 0, NULL, ?, ?, ?, ?, ?)
ON CONFLICT (source, external_id) DO NOTHING;

-- name: order_no_by_external
SELECT order_no FROM orders WHERE source = ? AND external_id = ?;

-- name: checkpoint
UPDATE orders SET state = ?, stage = ?, status = ?, attempts = ?, wake_at = ?, doc = ?, updated_at = ?
WHERE order_no = ?;

-- name: checkpoint_if
UPDATE orders SET state = ?, stage = ?, status = ?, attempts = ?, wake_at = ?, doc = ?, updated_at = ?
WHERE order_no = ? AND state = ?;

-- name: history
INSERT INTO stage_history (order_no, stage, outcome, reason, at) VALUES (?, ?, ?, ?, ?);

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
FROM orders WHERE state IN ('queued', 'parked', 'wait_pay') ORDER BY created_at;

-- name: orders_in_state
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE state = ? AND order_no > ? ORDER BY order_no LIMIT ?;

-- name: children
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders WHERE parent_no = ? ORDER BY order_no;

-- name: order_history
SELECT order_no, stage, outcome, reason, at FROM stage_history WHERE order_no = ? ORDER BY rowid;

-- name: counts
SELECT state, count(*) FROM orders GROUP BY state;

-- name: add_event
INSERT INTO order_events (order_no, from_status, to_status, at) VALUES (?, ?, ?, ?);

-- name: order_events
SELECT order_no, from_status, to_status, at FROM order_events WHERE order_no = ? ORDER BY id;

-- name: search_orders
-- Filters left empty ('' / '[]') match everything; paging is by order number.
SELECT order_no, kind, state, stage, status, attempts, wake_at, doc, parent_no, updated_at
FROM orders
WHERE (?1 = '' OR member_id = ?1)
  AND (?2 = '[]' OR status IN (SELECT value FROM json_each(?2)))
  AND (?3 = '' OR state = ?3)
  AND order_no > ?4
ORDER BY order_no LIMIT ?5;
