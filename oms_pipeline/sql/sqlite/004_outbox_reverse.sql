-- The outbox: every business event and downstream command, written in the
-- same transaction as the checkpoint that made it: the relay publishes rows
-- and marks them (oms_pipeline/relay.py). order_events stays the history.
CREATE TABLE outbox (
    id            INTEGER PRIMARY KEY,
    order_no      TEXT NOT NULL,
    topic         TEXT NOT NULL,
    key           TEXT NOT NULL,
    payload       BLOB NOT NULL,
    at            REAL NOT NULL,
    claimed_by    TEXT,
    claimed_at    REAL,
    published_at  REAL
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Reverse orders (cancel, return, rejection, exchange, reissue, pull-back):
-- records of their own, linked to the original order by number.
CREATE TABLE reverse_orders (
    reverse_no   TEXT PRIMARY KEY,
    order_no     TEXT NOT NULL,
    request_key  TEXT NOT NULL,
    kind         TEXT NOT NULL,
    state        TEXT NOT NULL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    doc          BLOB NOT NULL,
    UNIQUE (order_no, request_key)
);
CREATE INDEX reverse_orders_open ON reverse_orders (reverse_no) WHERE state NOT IN ('done', 'refused');
