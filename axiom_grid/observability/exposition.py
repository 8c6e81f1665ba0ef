"""``GET /metrics``: the host's metrics in the Prometheus text format, to an operator's key.

Each scrape builds its registry: in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) prometheus_client's
``MultiProcessCollector`` adds up the files of every process of the host (gunicorn's workers, Celery's pool
and beat), whichever web process answers; otherwise this process's own registry. OpenMetrics is answered to
a scraper that asks for it (``Accept``), the classic text format otherwise.

A Celery worker that runs apart from the web processes (a container of its own) serves the same on
``METRICS_BIND`` without a key, for Prometheus to scrape on a private network (``metrics_serve``).

The fleet's utilization is not counted by any process: a periodic task (``optimization.fleet``) computes it
with one aggregate query per table and stores a snapshot in the cache, and each scrape turns that snapshot
into histograms and threshold counts. A scrape therefore costs one cache read whatever the fleet's size, and
every web process (and host, with Redis) shows the same numbers. A snapshot older than
``FLEET_SNAPSHOT_SECONDS`` is gone from the cache, and its metrics with it: a stopped task shows as missing
data, not as frozen figures.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from django.core.cache import cache
from django.http import HttpResponse
from drf_spectacular.utils import extend_schema
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString
from rest_framework.views import APIView

from allocation.api.shared.auth import ApiKeyAuthentication, IsOperator
from axiom_grid.observability.metrics import multiprocess_dir

logger = logging.getLogger(__name__)

FLEET_SNAPSHOT_KEY = "observability:fleet-utilization"
FLEET_SNAPSHOT_SECONDS = 3600


class _ThisProcess:
    """This process's registry as one collector of a scrape's registry (single-process mode)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def fleet_snapshot_store(snapshot: dict) -> None:
    cache.set(FLEET_SNAPSHOT_KEY, snapshot, FLEET_SNAPSHOT_SECONDS)


def fleet_snapshot_read() -> dict | None:
    try:
        return cache.get(FLEET_SNAPSHOT_KEY)
    except Exception:  # any cache error: the other metrics are still worth answering
        logger.warning("the fleet utilization snapshot could not be read from the cache", exc_info=True)
        return None


class FleetUtilizationCollector:
    """The last fleet snapshot as metrics. A snapshot holds, for quotas (by resource type) and budgets (by
    scope), the share bounds of its histogram and the thresholds it counts, and per label value the
    cumulative count at each bound, the count, the sum, and the count at or over each threshold."""

    FAMILIES = (
        (
            "quotas",
            "quota",
            "resource_type",
            "Current-period quotas by (used + reserved) / limit, by resource type.",
        ),
        (
            "budgets",
            "budget",
            "scope",
            "Budgets by (spent + reserved) / (limit + rollover) in their current window, by scope "
            "(organization, team, agent, run; runs that have ended are left out).",
        ),
    )

    def collect(self) -> Iterator[Metric]:
        snapshot = fleet_snapshot_read()
        if not snapshot:
            return
        for key, noun, label, description in self.FAMILIES:
            part = snapshot[key]
            histogram = HistogramMetricFamily(
                f"axiom_grid_{noun}_utilization_ratio", description, labels=[label]
            )
            at_least = GaugeMetricFamily(
                f"axiom_grid_{noun}s_utilized",
                f"{noun.title()}s using at least the share at_least of what they allow (the fleet snapshot).",
                labels=[label, "at_least"],
            )
            for value, figures in sorted(part["by"].items()):
                buckets = [
                    (floatToGoString(bound), count)
                    for bound, count in zip(part["bounds"], figures["buckets"], strict=True)
                ]
                buckets.append(("+Inf", figures["count"]))
                histogram.add_metric([value], buckets, figures["sum"])
                for threshold, count in zip(part["thresholds"], figures["at_least"], strict=True):
                    at_least.add_metric([value, floatToGoString(threshold)], count)
            yield histogram
            yield at_least
        yield GaugeMetricFamily(
            "axiom_grid_fleet_utilization_timestamp_seconds",
            "Unix time the fleet utilization snapshot was computed.",
            value=snapshot["computed_at"],
        )
        yield GaugeMetricFamily(
            "axiom_grid_fleet_utilization_query_seconds",
            "How long computing the fleet utilization snapshot took.",
            value=snapshot["seconds"],
        )


def scrape_registry() -> CollectorRegistry:
    """What one scrape reports: the host's processes (or this one), and the fleet snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(FleetUtilizationCollector())
    return registry


def metrics_serve(bind: str):
    """Serve what ``/metrics`` reports, without a key, on ``bind`` (``host:port``) from a thread of this
    process (``METRICS_BIND``: the Celery worker's main process serves it, ``axiom_grid.celery``). Returns
    the server and its thread."""
    host, _, port = bind.rpartition(":")
    return start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=scrape_registry())


@extend_schema(exclude=True)  # for Prometheus, not an API client: documented in the README
class MetricsView(APIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsOperator]

    def perform_content_negotiation(self, request, force=False):
        # The metrics pick their own format (choose_encoder); a refusal is JSON, whatever a scraper accepts.
        return super().perform_content_negotiation(request, force=True)

    def get(self, request):
        encoder, content_type = choose_encoder(request.headers.get("Accept"))
        return HttpResponse(encoder(scrape_registry()), content_type=content_type)
