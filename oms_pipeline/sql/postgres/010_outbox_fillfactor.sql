-- The relay's claim rewrites every outbox row once (claimed_by, claimed_at). Neither column is
-- indexed, so the new version can stay on its page (a HOT update, no new index entries), but only
-- if the page has room: at the default fillfactor COPY fills each page, and nearly every claim
-- wrote a new row version elsewhere plus an entry in both indexes. Affects pages written from now on.
ALTER TABLE outbox SET (fillfactor = 50);
