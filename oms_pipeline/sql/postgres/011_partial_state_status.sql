-- The state and status indexes keep only the orders someone looks for by state or status: the
-- ones still open. An orders table is mostly orders that have reached a final state and status
-- (done, dispatched, completed...), and every write of an order row took an entry in both
-- indexes, the last write of each order included. Now that last write takes none
-- (bench/RESULTS.md: the three state, status and member indexes were ~20% of PostgreSQL's CPU).
--
-- Reads still find every order:
--   * in_state (exception centre: manual; the reverse flow: paused; restart: split) and the
--     sweepers (queued, parked, wait_pay: orders_by_owner, orders_overdue) ask for open states;
--   * search by a final status or state pages through the primary key, where such orders are
--     most rows, so a page fills after reading little more than itself.
-- Both statements are planned with their values (plan_cache_mode = force_custom_plan), so the
-- planner can see that a partial index covers them.
DROP INDEX orders_by_state;
CREATE INDEX orders_by_state ON orders (state, order_no) WHERE state IN ('manual', 'paused', 'split');
DROP INDEX orders_by_status;
CREATE INDEX orders_by_status ON orders (status, order_no)
    WHERE status NOT IN ('DISPATCHED', 'SHIPPED', 'DELIVERED', 'COMPLETED', 'CANCELLED',
                         'RETURNED', 'REFUNDED', 'REJECTED');
