"""The benchmark harness (`oms bench SCENARIO`): scenarios in TOML, an open-loop
seeded load generator, runners for the pipeline and the strategies it is
compared with, a pool-size advisor, and JSON / Markdown / PNG reports.

Modules: `scenario` (loading), `load` (arrivals and the driver), `probe`
(sampling and latency), `synthetic` (generated stages), `strategies`
(per-stage pools, one shared pool, a task per order, the raw queue chain),
`daemon` (the real stages on the embedded and production backends),
`advisor`, `peers` (Celery, Dramatiq), `report`, `plots`, `harness` (runs a
scenario end to end) and `command` (the `oms bench` sub-command).
"""
