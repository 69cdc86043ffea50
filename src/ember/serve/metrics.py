"""`/metrics`: the server's Prometheus metrics (prometheus_client, text format), named as vLLM names
its own with an `ember_` prefix.

Counted as requests go: HTTP requests by endpoint and status; prompt and generated tokens; finished
requests by finish reason; histograms of time to first token, inter-token latency and request latency
(measured on the scheduler thread, when a step's tokens are ready). Read at each scrape: requests
running and waiting, KV-cache usage (tokens held / slots x context), and the prefix cache's queries,
hits (requests and tokens), usage and evictions.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0)


class Metrics:
    """One app's metrics, in a registry of their own (several apps in one process do not mix)."""

    def __init__(self, scheduler=None, routes=()):
        self.registry = r = CollectorRegistry()
        self.scheduler = scheduler
        self.routes = set(routes)  # endpoint labels: the app's own paths, anything else is "other"
        self.http = Counter("ember_http_requests", "HTTP requests answered, by endpoint and status code",
                            ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("ember_prompt_tokens", "Prompt tokens of finished generation requests",
                                     registry=r)
        self.generation_tokens = Counter("ember_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("ember_request_success", "Generation requests finished, by finish reason",
                                ["finished_reason"], registry=r)
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Time from a request's submission to its "
                              "first token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("ember_inter_token_latency_seconds", "Time between a request's successive tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.latency = Histogram("ember_e2e_request_latency_seconds", "Time from a request's submission to its "
                                 "last token", buckets=LATENCY_BUCKETS, registry=r)
        r.register(_StateCollector(self))

    # ---- from the scheduler thread ---------------------------------------------------------------
    def observe(self, entry, event, now: float) -> None:
        """One event of a request (see Scheduler.observer); `entry` carries t0 and t_last."""
        if event.token_id is not None:
            self.generation_tokens.inc()
            if entry.t_last is None:
                self.ttft.observe(now - entry.t0)
            else:
                self.itl.observe(now - entry.t_last)
            entry.t_last = now
        if event.finished:
            self.prompt_tokens.inc(len(event.request.prompt_ids))
            self.finished.labels(event.finish_reason or "stop").inc()
            self.latency.observe(now - entry.t0)

    # ---- HTTP --------------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector:
    """Gauges and counters read from the scheduler and the prefix cache at scrape time."""

    def __init__(self, m: Metrics):
        self.m = m

    def collect(self):
        sch = self.m.scheduler
        running = GaugeMetricFamily("ember_num_requests_running", "Requests in KV-cache slots")
        waiting = GaugeMetricFamily("ember_num_requests_waiting", "Requests waiting for a slot")
        usage = GaugeMetricFamily("ember_kv_cache_usage_perc", "KV-cache use: tokens held / (slots x context), 0..1")
        gen = getattr(sch, "generator", None)
        if sch is not None:
            running.add_metric([], sch.running)
            waiting.add_metric([], sch.waiting)
            usage.add_metric([], kv_usage(gen))
        yield running
        yield waiting
        yield usage
        pc = getattr(gen, "prefix_cache", None)
        stats = dict(pc.stats) if pc is not None else {}
        for name, key, doc in (("queries", "queries", "Prompts looked up in the prefix cache"),
                               ("hits", "hits", "Prompts that reused a cached prefix"),
                               ("query_tokens", "query_tokens", "Prompt tokens looked up in the prefix cache"),
                               ("hit_tokens", "hit_tokens", "Prompt tokens reused from the prefix cache "
                                                            "(not prefilled)"),
                               ("evicted_blocks", "evicted_blocks", "Prefix-cache blocks evicted (LRU)")):
            c = CounterMetricFamily(f"ember_prefix_cache_{name}", doc)
            c.add_metric([], stats.get(key, 0))
            yield c
        g = GaugeMetricFamily("ember_prefix_cache_usage_perc", "Prefix-cache blocks in use / its capacity, 0..1")
        g.add_metric([], pc.usage if pc is not None else 0.0)
        yield g


def kv_usage(gen) -> float:
    """Tokens held in the generator's slots / their capacity (a snapshot read from another thread)."""
    try:
        slots = list(gen.slots)
        cap = len(slots) * gen.max_len
        return sum(s.pos for s in slots if s is not None) / cap if cap else 0.0
    except Exception:  # noqa: BLE001 - no generator, or one without slots: nothing to report
        return 0.0


class MetricsMiddleware:
    """Counts every HTTP response by endpoint (the app's own paths; "other" for the rest) and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [None]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in self.metrics.routes else "other"
            self.metrics.http.labels(endpoint, str(status[0] or 499)).inc()


def register(app, metrics: Metrics) -> None:
    """GET /metrics on `app`."""
    from starlette.responses import Response

    @app.get("/metrics", include_in_schema=True, summary="Prometheus metrics (text format)")
    async def metrics_endpoint():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)
