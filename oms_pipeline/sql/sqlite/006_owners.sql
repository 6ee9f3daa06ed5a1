-- Ownership of orders by daemon instance (oms_pipeline/ports/store.py, "Ownership"): each order
-- names its owner, each instance renews its own liveness, and a dead instance's queued orders are
-- taken over.
ALTER TABLE orders ADD COLUMN owner TEXT NOT NULL DEFAULT '';
CREATE INDEX orders_by_owner ON orders (owner, order_no) WHERE state = 'queued';
CREATE TABLE instances (holder TEXT PRIMARY KEY, alive_until REAL NOT NULL)
