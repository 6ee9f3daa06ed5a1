-- Business state changes (CREATED -> WAIT_PAY -> PAID -> ...), written in the
-- same transaction as the checkpoint that made them: the outbox a relay
-- publishes from (`published_at` stays NULL until it has).
CREATE TABLE order_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_no     text NOT NULL,
    from_status  text NOT NULL,
    to_status    text NOT NULL,
    at           double precision NOT NULL,
    published_at double precision
);
CREATE INDEX order_events_by_order ON order_events (order_no, id);
-- The relay's queue: small, because published rows leave it.
CREATE INDEX order_events_unpublished ON order_events (id) WHERE published_at IS NULL;
