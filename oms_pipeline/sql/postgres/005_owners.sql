-- Ownership of orders by daemon instance (oms_pipeline/ports/store.py, "Ownership"): each order
-- names its owner and every checkpoint is refused for an order another instance took over; each
-- instance renews its own liveness (one row, not one per order); a dead instance's queued
-- orders are taken over once its liveness has lapsed.
ALTER TABLE orders ADD COLUMN owner text NOT NULL DEFAULT '';
CREATE INDEX orders_by_owner ON orders (owner, order_no) WHERE state = 'queued';
CREATE TABLE instances (holder text PRIMARY KEY, alive_until double precision NOT NULL);
