"""The operator surface: HTTP API, OpenAPI document, Prometheus metrics, decision log, dashboard."""

from pbxguard.api.app import build_app
from pbxguard.api.context import ApiContext
from pbxguard.api.metrics import DecisionLog, Metrics

__all__ = ["ApiContext", "DecisionLog", "Metrics", "build_app"]
