"""Prometheus metrics (names prefixed `oms_`).

Stage workers count in plain integers on the hot path (a labelled
prometheus-client child costs about a microsecond per call, as much as a
whole stage hop); a custom collector turns the counts into metric families
when Prometheus scrapes.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    Metric)
from prometheus_client.registry import Collector

from .outcome import OUTCOMES

if TYPE_CHECKING:
    from .pipeline import Pipeline

HANDLER_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class Histogram:
    """Bucket counts kept as a list; `observe` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, value: float, n: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float:
        """An upper bound for quantile q (the bucket edge it falls in)."""
        target, total = q * self.count, 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            if total >= target and total:
                return bound
        return 0.0


class StageStats:
    __slots__ = ("stage", "processed", "latency", "in_flight")

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.processed = dict.fromkeys(OUTCOMES, 0)
        self.latency = Histogram(HANDLER_BUCKETS)
        self.in_flight = 0

    def observe_batch(self, outcomes: Iterable) -> None:
        processed = self.processed
        for outcome in outcomes:
            processed[outcome.kind] += 1


class IntakeCounts:
    """Broker intake messages by (queue, result); results: accepted, duplicate, dead_lettered, retried."""

    def __init__(self) -> None:
        self.messages: dict[tuple[str, str], int] = {}

    def add(self, queue: str, result: str, n: int = 1) -> None:
        self.messages[(queue, result)] = self.messages.get((queue, result), 0) + n

    @property
    def dead_letters(self) -> int:
        return sum(n for (_, result), n in self.messages.items() if result == "dead_lettered")


class PipelineCollector(Collector):
    def __init__(self, pipeline: "Pipeline", intake: IntakeCounts | None = None) -> None:
        self.pipeline = pipeline
        self.intake = intake or IntakeCounts()  # none: the embedded default has no intake queues

    def collect(self) -> Iterable[Metric]:
        p = self.pipeline
        workers = list(p.workers.values())
        yield _stage_gauge("oms_stage_queue_depth", "Orders waiting in the stage's queue.",
                           ((w.name, len(w.queue)) for w in workers))
        yield _stage_gauge("oms_stage_queue_bound", "The stage queue's bound.",
                           ((w.name, w.queue.maxsize) for w in workers))
        yield _stage_gauge("oms_stage_in_flight", "Orders the stage's slots are working on.",
                           ((w.name, w.stats.in_flight) for w in workers))
        yield _stage_gauge("oms_stage_busy_slots", "Slots of the stage's pool working on a batch.",
                           ((w.name, w.busy) for w in workers))
        yield _stage_gauge("oms_stage_pool_size", "The stage's configured pool size.",
                           ((w.name, w.pool) for w in workers))
        yield _stage_gauge("oms_stage_producers_waiting", "Producers blocked on the stage's full queue.",
                           ((w.name, w.queue.waiting_producers) for w in workers))
        processed = CounterMetricFamily("oms_stage_processed", "Orders a stage finished, by outcome.",
                                        labels=["stage", "outcome"])
        for w in workers:
            for outcome, n in w.stats.processed.items():
                processed.add_metric([w.name, outcome], n)
        yield processed
        latency = HistogramMetricFamily("oms_stage_handler_seconds",
                                        "Slot time per order: a batch's handling time divided by its orders.",
                                        labels=["stage"])
        for w in workers:
            latency.add_metric([w.name], w.stats.latency.buckets(), w.stats.latency.sum)
        yield latency
        yield from self._pipeline_metrics(p)
        yield from self._intake_metrics(self.intake)

    @staticmethod
    def _intake_metrics(intake: IntakeCounts) -> Iterable[Metric]:
        messages = CounterMetricFamily("oms_intake_messages", "Broker intake messages handled, by queue and result.",
                                       labels=["queue", "result"])
        for (queue, result), n in sorted(intake.messages.items()):
            messages.add_metric([queue, result], n)
        yield messages
        yield CounterMetricFamily("oms_dead_letters", "Messages the intake put on its dead-letter queue.",
                                  value=intake.dead_letters)

    def _pipeline_metrics(self, p: "Pipeline") -> Iterable[Metric]:
        e2e = HistogramMetricFamily("oms_order_e2e_seconds",
                                    "From intake (or payment) to the end of fulfilment.")
        e2e.add_metric([], p.e2e.buckets(), p.e2e.sum)
        yield e2e
        states = GaugeMetricFamily("oms_orders", "Orders by runtime state (refreshed periodically).",
                                   labels=["state"])
        for state, n in sorted(p.state_counts.items()):
            states.add_metric([state], n)
        yield states
        yield GaugeMetricFamily("oms_timers_pending", "Timers waiting to fire (parks, retries, deadlines); "
                                "on RabbitMQ, messages: timers due together share one.", value=p.timers.pending)
        yield GaugeMetricFamily("oms_orders_in_flight", "Orders this instance is working on.",
                                value=len(p.in_flight))
        yield CounterMetricFamily("oms_orders_intake", "Orders accepted at intake.", value=p.intake_count)
        finished = CounterMetricFamily("oms_orders_finished", "Orders that reached an end of the pipeline.",
                                       labels=["end"])
        for end, n in sorted(p.finished.items()):
            finished.add_metric([end], n)
        yield finished


def _stage_gauge(name: str, doc: str, values: Iterable[tuple[str, float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["stage"])
    for stage, value in values:
        family.add_metric([stage], value)
    return family


class RelayCollector(Collector):
    """The outbox relay's counts (oms_pipeline/relay.py); nothing when there is no relay."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay

    def collect(self) -> Iterable[Metric]:
        if self.relay is None:
            return
        stats = self.relay.stats
        yield GaugeMetricFamily("oms_outbox_pending", "Outbox rows not yet published (refreshed every few seconds).",
                                value=stats.pending)
        yield GaugeMetricFamily("oms_outbox_undeliverable",
                                "Outbox rows held back as undeliverable (unroutable, refused), retried with backoff.",
                                value=stats.undeliverable)
        published = CounterMetricFamily("oms_outbox_published", "Outbox rows published and confirmed, by topic.",
                                        labels=["topic"])
        for topic, n in sorted(stats.published.items()):
            published.add_metric([topic], n)
        yield published
        errors = CounterMetricFamily("oms_outbox_publish_errors",
                                     "Failed publishes, by kind: unavailable (a whole batch), transient (one row), "
                                     "undeliverable (one row that cannot be delivered as it is).", labels=["kind"])
        for kind in ("unavailable", "transient", "undeliverable"):
            errors.add_metric([kind], stats.errors.get(kind, 0))
        yield errors
        handoff = self.relay.handoff  # None: a store that does not hand rows off (0 below)
        yield GaugeMetricFamily("oms_outbox_handoff_waiting",
                                "Committed outbox rows the store handed to the relay in memory, not yet taken.",
                                value=len(handoff) if handoff is not None else 0)
        yield CounterMetricFamily("oms_outbox_handoff_dropped",
                                  "Handed rows dropped from memory because too many were waiting (the relay "
                                  "fell behind): they stay in the outbox and are claimed once their lease lapses.",
                                  value=handoff.dropped if handoff is not None else 0)
