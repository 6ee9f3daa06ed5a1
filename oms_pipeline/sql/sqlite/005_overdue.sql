-- The sweeper's look-up: parked and payment-waiting orders by wake time (pay deadline).
CREATE INDEX orders_overdue ON orders (wake_at) WHERE state IN ('parked', 'wait_pay')
