"""Prometheus metrics of the gateway (GET /metrics), one registry per app.

Latencies carry the model's name, so the dashboard shows them per worker. The last prompt
cache misses (with the worker's reason, e.g. `diverged_at_token_812`) are kept in a short
ring for GET /admin/status: a reason with a token position is no Prometheus label.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

MISSES_KEPT = 20
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mlxtg_requests", "Generation requests by final status", ["status"], registry=r
        )
        self.ttft = Histogram(
            "mlxtg_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "mlxtg_inter_token_seconds",
            "Time between streamed tokens of one choice",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.prompt_tokens = Counter("mlxtg_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_tokens = Counter(
            "mlxtg_cached_prompt_tokens", "Prompt tokens served from the KV cache", registry=r
        )
        self.generated_tokens = Counter("mlxtg_generated_tokens", "Tokens generated", registry=r)
        self.misses: deque[dict[str, Any]] = deque(maxlen=MISSES_KEPT)

    def request_done(self, status: str) -> None:
        self.requests.labels(status=status).inc()

    def observe_run(self, run: Any, completion_tokens: int) -> None:
        self.prompt_tokens.inc(run.prompt_tokens)
        self.cached_tokens.inc(run.cached_tokens)
        self.generated_tokens.inc(completion_tokens)
        if run.first_token_at is not None:
            self.ttft.labels(model=run.model).observe(max(0.0, run.first_token_at - run.started_at))
        for facts in run.facts:
            if facts.cache_miss_reason:
                self.misses.append(
                    {
                        "time": time.time(),
                        "model": run.model,
                        "reason": facts.cache_miss_reason,
                        "source": facts.cache_source,
                        "cached_tokens": facts.cached_tokens,
                        "prompt_tokens": facts.prompt_tokens,
                    }
                )

    def inter_token(self, model: str, seconds: float) -> None:
        self.itl.labels(model=model).observe(seconds)

    def recent_misses(self) -> list[dict[str, Any]]:
        """The last prompt cache misses (and partial hits with a reason), newest first."""
        return list(reversed(self.misses))

    def render(self, extra: bytes = b"") -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Several gateways (`mlxtg up --gateways N`): every process writes its values
            # to that folder, and this sums them, so any gateway answers for all.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry) + extra
        return generate_latest(self.registry) + extra


def now() -> float:
    return time.monotonic()
