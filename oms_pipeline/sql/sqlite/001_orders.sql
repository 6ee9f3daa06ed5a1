-- Orders, their progress and history: the embedded (SQLite) store.
CREATE TABLE orders (
    order_no    TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,          -- runtime state: queued, parked, wait_pay, done, ...
    stage       TEXT NOT NULL,          -- the stage to run next, or the terminal reached
    status      TEXT NOT NULL,          -- business status (states.py)
    attempts    INTEGER NOT NULL DEFAULT 0,
    wake_at     REAL,
    parent_no   TEXT,
    doc         BLOB NOT NULL,          -- the order document (msgspec JSON)
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    UNIQUE (source, external_id)        -- intake is idempotent on (source, external id)
);
CREATE INDEX orders_by_state ON orders (state, order_no);
CREATE INDEX orders_by_parent ON orders (parent_no) WHERE parent_no IS NOT NULL;

CREATE TABLE stage_history (
    order_no TEXT NOT NULL,
    stage    TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    reason   TEXT NOT NULL,
    at       REAL NOT NULL
);
CREATE INDEX stage_history_by_order ON stage_history (order_no);

CREATE TABLE sequences (
    name TEXT PRIMARY KEY,
    next INTEGER NOT NULL
);
