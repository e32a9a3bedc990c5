"""The server's Prometheus metrics (``/metrics``)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cllm_rt_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("cllm_rt_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("cllm_rt_generation_tokens", "tokens generated for requests", registry=r)
        self.forwards = Counter("cllm_rt_decode_forwards", "decode forwards (prefill excluded)", registry=r)
        self.row_steps = Counter("cllm_rt_row_steps", "rows taking part in decode forwards", registry=r)
        self.accepted = Counter("cllm_rt_accepted_tokens", "tokens made final by decode forwards", registry=r)
        self.tokens_per_forward = Gauge("cllm_rt_tokens_per_forward", "mean tokens made final per row per decode "
                                        "forward since the start", registry=r)
        self.queue_depth = Gauge("cllm_rt_queue_depth", "requests waiting to join the batch", registry=r)
        self.running = Gauge("cllm_rt_running_requests", "requests decoding in the batch", registry=r)
        self.ttft = Histogram("cllm_rt_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("cllm_rt_time_per_output_token_seconds", "first to last token, per later "
                                   "token", buckets=_TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("cllm_rt_request_latency_seconds", "arrival to last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("cllm_rt_queue_time_seconds", "arrival to joining the batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)

    def finished(self, generation: Generation) -> None:
        now = time.perf_counter()
        self.latency.observe(now - generation.arrived)
        if generation.tokens > 1:
            self.per_token.observe((now - generation.first_token) / (generation.tokens - 1))
