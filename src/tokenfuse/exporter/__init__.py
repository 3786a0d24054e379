"""The metric contract, the `Meter`, the instrumented httpx transports and /metrics exposition."""

from __future__ import annotations

from tokenfuse.exporter.exposition import start_metrics_server
from tokenfuse.exporter.labels import CallLabels, LabelBounds
from tokenfuse.exporter.meter import CallRecord, Meter, default_meter
from tokenfuse.exporter.metrics import Metrics
from tokenfuse.exporter.transport import AsyncMeteredTransport, MeteredTransport, current_labels, labels

__all__ = [
    "AsyncMeteredTransport",
    "CallLabels",
    "CallRecord",
    "LabelBounds",
    "Meter",
    "MeteredTransport",
    "Metrics",
    "current_labels",
    "default_meter",
    "labels",
    "start_metrics_server",
]
