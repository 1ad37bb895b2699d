"""Every metric a control-plane app exports, on a registry of its own.

One `Metrics` per app (services/app.py makes it and passes it to what counts):
never prometheus_client's global REGISTRY, so several apps in one process (the
tests) keep their own counts. What is counted on the request path is a counter
or a histogram whose label children are cached (a dict lookup, then an
increment: well under a microsecond each); what describes the pool, the
connections and the open reservations is read when Prometheus scrapes
(services/metrics/scrape.py), never updated per request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

from services.metrics.counter import LoopCounter
from services.metrics.histogram import LoopHistogram
from services.metrics.labels import CodeLabels, ModelLabels, known_codes

# Seconds: a first token takes from tens of ms (warm cache, Metal) to tens of seconds (a cold CPU worker).
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
# Seconds between two tokens reaching the gateway.
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# Tokens per second one answer was decoded at, as the gateway received it.
RATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 35.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0)
# Seconds from a request's end to its ledger row being written.
SETTLE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0)
AUTH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

CANARY_RESULTS = frozenset(
    {"passed", "failed", "inconclusive", "recorded", "no_reference", "unanswered", "error", "skipped"}
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds (Linux: read from /proc at scrape).
        ProcessCollector(registry=r)
        self.codes = CodeLabels(known_codes())
        self.models = ModelLabels()
        # ---- HTTP, every route of every service (services/metrics/http.py) ----
        # Counted on every response and request: not prometheus_client's locked Counter (counter.py).
        self.http_requests = LoopCounter(
            "mp_http_requests",
            "HTTP responses by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_errors = LoopCounter(
            "mp_http_errors", "HTTP error responses by route template and error code.", ["route", "code"], registry=r
        )
        # ---- buyer requests at the gateway (services/gateway/exchange.py) ----
        self.requests = LoopCounter(
            "mp_gateway_requests",
            "Inference requests by surface, model and outcome (ok or the error code they ended with, "
            "streams' in-band errors included).",
            ["surface", "model", "outcome"],
            registry=r,
        )
        self.ttft = LoopHistogram(
            "mp_gateway_ttft_seconds",
            "Time from a request's arrival to its first token reaching the gateway.",
            "model",
            TTFT_BUCKETS,
            registry=r,
        )
        # Observed for every frame of every stream: not prometheus_client's locked Histogram (histogram.py).
        self.inter_token = LoopHistogram(
            "mp_gateway_inter_token_seconds",
            "Time between two tokens of an answer reaching the gateway (per frame, divided by its tokens).",
            "model",
            INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.decode_rate = LoopHistogram(
            "mp_gateway_decode_tokens_per_second",
            "Tokens per second of each answer after its first token (answers of 2 tokens or more).",
            "model",
            RATE_BUCKETS,
            registry=r,
        )
        self.completion_tokens = LoopCounter(
            "mp_gateway_completion_tokens",
            "Completion tokens delivered to buyers (rate() is tokens/s).",
            ["model"],
            registry=r,
        )
        self.prompt_tokens = LoopCounter(
            "mp_gateway_prompt_tokens", "Prompt tokens of the requests answered.", ["model"], registry=r
        )
        self.failovers = Counter(
            "mp_gateway_failovers",
            "Requests moved to another provider mid-answer, by the reason.",
            ["reason"],
            registry=r,
        )
        self.declines = Counter(
            "mp_gateway_provider_declines",
            "Providers that did not take a request offered to them (refused, or silent past the accept timeout).",
            registry=r,
        )
        # ---- metering (services/usage/metering.py) ----
        self.quota_rejections = Counter(
            "mp_quota_rejections",
            "Requests refused by a quota, by holder kind and the limit hit.",
            ["holder", "limit"],
            registry=r,
        )
        # Observed per request (its one series).
        self.settlement_lag = LoopHistogram(
            "mp_usage_settlement_lag_seconds",
            "Time from a request's end to its settlement being durable (in the usage stream, or the ledger row).",
            None,
            SETTLE_BUCKETS,
            registry=r,
        ).labels()
        self.lease_grants = Counter(
            "mp_quota_lease_grants",
            "Quota lease statements this replica ran, by what its lease of the subject was short of when a request "
            "waited for it: requests (a new lease's first grant too), tokens, slots, or none (one not confirmed "
            "lately); or ahead: an idle lease standing by for its subject's next request, refilled at a maintenance "
            "tick. A grant covers about 2 s of a subject's rate here; many a second on one busy subject is churn.",
            ["short"],
            registry=r,
        )
        self.settle_failures = Counter(
            "mp_usage_settle_failures",
            "Settlements or batches of usage events whose write failed (retried; a lost one is settled by a sweeper).",
            registry=r,
        )
        self.usage_events_parked = Counter(
            "mp_usage_events_parked",
            "Usage events the ledger can never write (undecodable, or refused by Postgres), kept in "
            "usage_dead_letters instead of blocking their replica's later events. Any is a bug to look at.",
            registry=r,
        )
        self.stale_settled = Counter(
            "mp_usage_stale_reservations_settled",
            "Reservations whose gateway stopped reporting, settled by this replica's sweeper.",
            registry=r,
        )
        # ---- canaries (services/canary/) and the NATS auth callout (services/natsauth/) ----
        self.canary_runs = Counter("mp_canary_runs", "Canary checks by result.", ["result"], registry=r)
        self.natsauth_decisions = Counter(
            "mp_natsauth_decisions",
            "NATS logins the auth callout answered: granted, refused, or unreadable (no answer), by who asked.",
            ["decision", "kind"],
            registry=r,
        )
        self.natsauth_seconds = Histogram(
            "mp_natsauth_decision_seconds",
            "Time to answer one auth callout request.",
            buckets=AUTH_BUCKETS,
            registry=r,
        )

        self.http = self.http_requests.labels
        self.http_error = self.http_errors.labels
        self.request = self.requests.labels
        self.model_ttft = self.ttft.labels
        self.model_inter_token = self.inter_token.labels
        self.model_decode_rate = self.decode_rate.labels
        self.model_completion_tokens = self.completion_tokens.labels
        self.model_prompt_tokens = self.prompt_tokens.labels

    def canary(self, result: str) -> None:
        self.canary_runs.labels(result if result in CANARY_RESULTS else "other").inc()
