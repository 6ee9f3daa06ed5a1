-- The relay publishes from the outbox (003) and order_events is the order's status history
-- only, read by order number. Its index of unpublished rows held every row and served no query.
DROP INDEX IF EXISTS order_events_unpublished
