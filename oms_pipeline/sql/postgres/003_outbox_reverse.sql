-- The outbox: every business event and downstream command, written in the
-- same transaction as the checkpoint that made it. Relays (one per daemon
-- instance) claim rows with a lease, publish them and mark them
-- (oms_pipeline/relay.py). order_events stays the history.
-- Published rows stay for audit; a retention job may delete rows whose
-- published_at is older than the audit window (the partial index keeps the
-- relay's claims fast whatever the table's size).
CREATE TABLE outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_no      text NOT NULL,
    topic         text NOT NULL,
    key           text NOT NULL,
    payload       bytea NOT NULL,
    at            double precision NOT NULL,
    claimed_by    text,
    claimed_at    double precision,
    published_at  double precision
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Reverse orders (cancel, return, rejection, exchange, reissue, pull-back):
-- records of their own, linked to the original order by number.
CREATE TABLE reverse_orders (
    reverse_no   text PRIMARY KEY,
    order_no     text NOT NULL,
    request_key  text NOT NULL,
    kind         text NOT NULL,
    state        text NOT NULL,
    created_at   double precision NOT NULL,
    updated_at   double precision NOT NULL,
    doc          bytea NOT NULL,
    UNIQUE (order_no, request_key)
);
CREATE INDEX reverse_orders_open ON reverse_orders (reverse_no) WHERE state NOT IN ('done', 'refused');
