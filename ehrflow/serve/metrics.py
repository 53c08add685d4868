"""Prometheus metrics: request latency, jobs by state (read from the job store at scrape time),
LLM tokens (read from the workflow backend). One registry per app, so tests can build many."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _StoreCollector(Collector):
    def __init__(self, job_counts: Callable[[], dict[str, int]], llm_usage: Callable[[], dict[str, int]]):
        self.job_counts = job_counts
        self.llm_usage = llm_usage

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("ehrflow_jobs", "Jobs in the job store by state", labels=["state"])
        for state, n in sorted(self.job_counts().items()):
            jobs.add_metric([state], n)
        yield jobs
        tokens = CounterMetricFamily(
            "ehrflow_llm_tokens", "LLM tokens used by this process's workflows", labels=["kind"]
        )
        calls = CounterMetricFamily("ehrflow_llm_calls", "LLM calls that reached the model")
        try:
            usage = self.llm_usage()
        except Exception:  # noqa: BLE001 - a scrape must not fail because a replica is busy
            usage = {}
        tokens.add_metric(["prompt"], usage.get("prompt_tokens", 0))
        tokens.add_metric(["completion"], usage.get("completion_tokens", 0))
        calls.add_metric([], usage.get("calls", 0))
        yield tokens
        yield calls


class Metrics:
    def __init__(self, job_counts: Callable[[], dict[str, int]], llm_usage: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "ehrflow_request_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.jobs_finished = Counter(
            "ehrflow_job_outcomes", "Job attempts by outcome in this process", ["outcome"], registry=self.registry
        )
        self.registry.register(_StoreCollector(job_counts, llm_usage))
