"""steerserve's Prometheus metrics, next to vLLM's `vllm:*` ones on the same `/metrics`.

Named and labelled the way vLLM's are (`model_name`), plus `preset` and `kind` (which
intervention families a request uses: "none", "vectors", "heads+decoding", ...). Label
values come from bounded sets: presets registered on the server, the seven kinds, HTTP
statuses.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LABELS = ["model_name", "preset", "kind"]
# vLLM's buckets for the same quantities (vllm/v1/metrics/loggers.py).
_TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
_E2E_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]


class RequestSeries:
    """What one finished HTTP request adds: its status, its tokens (also when the client
    left) and, when served (200), its time to first token and latency. Named
    `<prefix>requests_total`, `<prefix>prompt_tokens_total`, ...; the steerserve series and
    the per-arm experiment series are two of these under different prefixes and labels."""

    def __init__(self, prefix: str, labels: list[str], by: str):
        self.requests = Counter(
            f"{prefix}requests", f"HTTP generation requests by status, {by}.", [*labels, "status"]
        )
        self.prompt_tokens = Counter(
            f"{prefix}prompt_tokens", f"Prompt tokens of finished requests, by {by}.", labels
        )
        self.generation_tokens = Counter(
            f"{prefix}generation_tokens", f"Generated tokens of finished requests, by {by}.", labels
        )
        self.ttft = Histogram(
            f"{prefix}time_to_first_token_seconds",
            f"From request arrival to the first generated token, by {by}.",
            labels,
            buckets=_TTFT_BUCKETS,
        )
        self.e2e = Histogram(
            f"{prefix}e2e_request_latency_seconds",
            f"From request arrival to its last byte, by {by}.",
            labels,
            buckets=_E2E_BUCKETS,
        )

    def observe(
        self,
        labels: dict[str, str],
        status: int,
        prompt_tokens: int,
        generation_tokens: int,
        ttft: float | None,
        latency: float,
    ) -> None:
        self.requests.labels(**labels, status=str(status)).inc()
        self.prompt_tokens.labels(**labels).inc(prompt_tokens)
        self.generation_tokens.labels(**labels).inc(generation_tokens)
        if status != 200:
            return
        if ttft is not None:
            self.ttft.labels(**labels).observe(ttft)
        self.e2e.labels(**labels).observe(latency)


class SteeringMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.finished = RequestSeries("steerserve:", _LABELS, "preset and intervention kind")
        self.running = Gauge(
            "steerserve:requests_running",
            "Generation requests being served.",
            _LABELS,
            multiprocess_mode="livesum",
        )
        self.slots_active = Gauge(
            "steerserve:intervention_slots_active",
            "Engine intervention slots held by running requests (distinct KV-affecting specs).",
            ["model_name"],
            multiprocess_mode="livemax",
        )
        self.slots_total = Gauge(
            "steerserve:intervention_slots_total",
            "Engine intervention slots available.",
            ["model_name"],
            multiprocess_mode="livemax",
        )

    def labels(self, preset: str | None, kind: str) -> dict[str, str]:
        return {"model_name": self.model_name, "preset": preset or "none", "kind": kind}

    def set_slots(self, stats: dict | None) -> None:
        if stats:
            self.slots_active.labels(self.model_name).set(stats["live_slots"])
            self.slots_total.labels(self.model_name).set(stats["slots"])


_ARM_LABELS = ["model_name", "experiment", "version", "arm"]


class ExperimentMetrics:
    """Per-arm series, so a dashboard can compare arms while an experiment runs.

    Label values are bounded: experiments and arms are registered by an admin, versions
    grow only when an admin changes an experiment.
    """

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.finished = RequestSeries("steerserve:experiment_", _ARM_LABELS, "experiment arm")
        self.errors = Counter(
            "steerserve:experiment_request_errors",
            "Experiment requests that did not end in 200 (client-closed ones included).",
            _ARM_LABELS,
        )

    def observe(
        self,
        experiment: str,
        version: int,
        arm: str,
        status: int,
        prompt_tokens: int,
        generation_tokens: int,
        ttft: float | None,
        latency: float,
    ) -> None:
        labels = {
            "model_name": self.model_name,
            "experiment": experiment,
            "version": str(version),
            "arm": arm,
        }
        self.finished.observe(labels, status, prompt_tokens, generation_tokens, ttft, latency)
        if status != 200:
            self.errors.labels(**labels).inc()
