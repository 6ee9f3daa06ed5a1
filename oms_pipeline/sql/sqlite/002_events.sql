-- Business state changes (CREATED -> WAIT_PAY -> PAID -> ...), written in the
-- same transaction as the checkpoint that made them: the outbox a relay
-- publishes from (`published_at` stays NULL until it has).
CREATE TABLE order_events (
    id           INTEGER PRIMARY KEY,
    order_no     TEXT NOT NULL,
    from_status  TEXT NOT NULL,
    to_status    TEXT NOT NULL,
    at           REAL NOT NULL,
    published_at REAL
);
CREATE INDEX order_events_by_order ON order_events (order_no, id);
CREATE INDEX order_events_unpublished ON order_events (id) WHERE published_at IS NULL;
