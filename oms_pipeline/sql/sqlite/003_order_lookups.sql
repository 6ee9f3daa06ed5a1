-- Customer-facing lookups: a member's orders, orders by business status.
ALTER TABLE orders ADD COLUMN member_id TEXT NOT NULL DEFAULT '';
UPDATE orders SET member_id = coalesce(json_extract(CAST(doc AS TEXT), '$.member_id'), '');
CREATE INDEX orders_by_member ON orders (member_id, order_no);
CREATE INDEX orders_by_status ON orders (status, order_no);
