"""/metrics: the server's Prometheus metrics, prefixed ``xllm_``, in a registry of each app's own.

Latencies and finished requests are recorded as they happen. The scheduler's and graph cache's counters are
read at scrape time from the last snapshot the engine thread published (``EngineLoop.snapshot``), so the
scrape never touches the scheduler, which only the engine thread may.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Latency buckets (seconds) from sub-millisecond decode steps on small models to long prefills.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Scheduler and graph-cache counters, each as (metric name, snapshot key, help).
_GAUGES = (
    ("xllm_requests_running", "running", "Requests being prefilled or decoded."),
    ("xllm_requests_waiting", "waiting", "Requests queued for admission (preempted ones included)."),
    ("xllm_kv_blocks_used", "kv_blocks_used", "KV-cache blocks held by sequences."),
    ("xllm_kv_blocks_total", "kv_blocks_total", "KV-cache blocks in the pool."),
    ("xllm_kv_blocks_cached", "cached_blocks", "Blocks held only by the prefix cache (evictable)."),
)
_COUNTERS = (
    ("xllm_prompt_tokens", "prompt_tokens", "Prompt tokens prefilled."),
    ("xllm_generation_tokens", "generation_tokens", "Tokens generated."),
    ("xllm_preemptions", "preemptions", "Sequences preempted to free KV blocks (recomputed later)."),
    ("xllm_prefix_cache_query_tokens", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("xllm_prefix_cache_hit_tokens", "prefix_cache_hits", "Prompt tokens served from the prefix cache."),
    ("xllm_bucket_hits", "graph_hits", "Steps run on a bucket graph."),
    ("xllm_bucket_fallbacks", "graph_fallbacks", "Steps no bucket covered (run on the dynamic graph)."),
)


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        for name, key, text in _GAUGES:
            yield GaugeMetricFamily(name, text, value=stats.get(key, 0))
        for name, key, text in _COUNTERS:
            yield CounterMetricFamily(name, text, value=stats.get(key, 0))
        steps = CounterMetricFamily(
            "xllm_steps", "Engine steps, by kind (mixed: decodes with prefill chunks).", labels=["kind"]
        )
        for kind in ("decode", "prefill", "mixed"):
            steps.add_metric([kind], stats.get(f"{kind}_steps", 0))
        yield steps


class ServerMetrics:
    """The metrics of one app; the histograms and counter are safe to update from any thread."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "xllm_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "xllm_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "xllm_requests_finished", "Requests finished, by why.", ["finish_reason"], registry=self.registry
        )
        self.registry.register(_EngineCollector(snapshot))
