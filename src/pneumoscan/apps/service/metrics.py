"""The service's Prometheus figures: one registry per app, filled by the middleware, the routes and ``/metrics``."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]


class ServiceMetrics:
    """Requests, latency, shedding and answers as they happen; drift and live performance set at each scrape."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("pneumoscan_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
        self.latency = Histogram("pneumoscan_http_request_seconds", "Request latency", ["route"], registry=registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))  # fmt: skip
        # Requests whose headers arrived and whose answer has not left: what a shutdown waits for.
        self.in_flight = Gauge("pneumoscan_http_requests_in_flight", "Requests being handled (a scrape counts itself)",
                               registry=registry)  # fmt: skip
        self.shed = Counter("pneumoscan_shed_requests", "Predictions refused with 503 at capacity", registry=registry)
        self.by_label = Counter("pneumoscan_predictions", "Answered predictions", ["label", "in_distribution"], registry=registry)
        self.batch_size = Histogram("pneumoscan_batch_images", "Images per model call (dynamic batching)", registry=registry,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16))  # fmt: skip
        self.drift_psi = Gauge("pneumoscan_drift_psi", "Population stability index of recent predictions against the card's "
                               "reference", ["indicator", "population"], registry=registry)  # fmt: skip
        self.drift_warning = Gauge("pneumoscan_drift_warning", "1 when an indicator's PSI passes the drift threshold", registry=registry)
        self.drift_window = Gauge("pneumoscan_drift_window_predictions", "Predictions in the drift window", registry=registry)
        self.live = Gauge("pneumoscan_live_performance", "Figures of the operating point in force from radiologists' readings "
                          "(value and Wilson 95 % bounds)", ["population", "figure", "bound"], registry=registry)  # fmt: skip
        self.live_read = Gauge("pneumoscan_live_read_studies", "Read studies with a decision, per population (point in force)",
                               ["population"], registry=registry)  # fmt: skip
        self.live_warning = Gauge("pneumoscan_live_performance_warning", "1 when the point in force falls short of its "
                                  "promised sensitivity by the readings", registry=registry)  # fmt: skip

    def set_drift(self, figures: dict) -> None:
        for indicator in figures["indicators"]:
            if indicator["psi"] is not None:
                self.drift_psi.labels(indicator["name"], indicator["population"] or "all").set(indicator["psi"])
        self.drift_warning.set(1 if figures["warning"] else 0)
        self.drift_window.set(figures["n"])

    def set_performance(self, performance: dict) -> None:
        for group in (g for g in performance["groups"] if g["in_force"]):
            self.live_read.labels(group["population"] or "all").set(group["n"])
            for name in ("sensitivity", "specificity", "ppv", "npv"):
                for bound in ("value", "low", "high"):
                    if group[name][bound] is not None:
                        self.live.labels(group["population"] or "all", name, bound).set(group[name][bound])
        self.live_warning.set(1 if performance["warning"] else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
