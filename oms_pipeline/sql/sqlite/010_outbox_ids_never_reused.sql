-- Outbox ids are never given twice. An event's message id is ORDERNO:event:ID and published rows
-- are deleted, so with a plain INTEGER PRIMARY KEY an emptied outbox numbered its next row 1 again,
-- and a consumer that de-duplicates on message ids would drop that event as already seen.
-- AUTOINCREMENT keeps the highest id ever given (sqlite_sequence). The ids given before this
-- migration are unknown (their rows are gone), so numbering goes on above the current time in
-- microseconds, more rows than any outbox could have had.
CREATE TABLE outbox_next (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    order_no      TEXT NOT NULL,
    topic         TEXT NOT NULL,
    key           TEXT NOT NULL,
    payload       BLOB NOT NULL,
    at            REAL NOT NULL,
    claimed_by    TEXT,
    claimed_at    REAL,
    published_at  REAL
);
INSERT INTO outbox_next (id, order_no, topic, key, payload, at, claimed_by, claimed_at, published_at)
SELECT id, order_no, topic, key, payload, at, claimed_by, claimed_at, published_at FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_next RENAME TO outbox;
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
DELETE FROM sqlite_sequence WHERE name IN ('outbox', 'outbox_next');
INSERT INTO sqlite_sequence (name, seq)
SELECT 'outbox', max(coalesce((SELECT max(id) FROM outbox), 0),
                     CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER));
