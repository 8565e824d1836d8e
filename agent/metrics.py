"""Prometheus metrics of one running agent, in the text exposition format (`GET /metrics`).

Counters and histograms are counted where things happen (receive, upload, retrieve); what is a
state rather than an event (the queue by state, the oldest study not yet in the cloud, free disk,
open associations, the cloud's reachability) is read when Prometheus scrapes, by `StateCollector`,
so it can never drift from the store. Names carry the `dirigo_` prefix and base units (seconds,
bytes); labels hold states, services and reasons, never a UID, an AE title or a patient.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UPLOAD_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))
"""Seconds to send one study part: a small series on a fast link to a large CT on a slow one."""
RETRIEVE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))
"""Seconds to fetch one instance from the archive."""


@dataclass(frozen=True)
class State:
    """What the agent's state gauges show at one scrape."""

    studies: dict[str, int]
    instances: dict[str, int]
    jobs: dict[str, int]
    oldest_unsent_age: float | None
    """Seconds since the first instance of the oldest part not yet in the cloud arrived."""
    disk_free: int
    disk_total: int
    associations: dict[str, int]
    """Open DICOM associations by service (store, echo, find, get, move)."""
    cloud_up: bool | None
    """None until the cloud was first probed."""


class Metrics:
    """The agent's metrics, in a registry of their own (not the process-wide default one, which
    would mix in other libraries' and outlive a stopped agent in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "dirigo_instances_received", "Instances received and acknowledged.", registry=r
        )
        self.rejected = Counter(
            "dirigo_instances_rejected",
            "Instances answered with a failure status, by status.",
            ["reason"],
            registry=r,
        )
        self.quarantined = Counter(
            "dirigo_instances_quarantined", "Rejected instances kept in quarantine.", registry=r
        )
        self.received_bytes = Counter(
            "dirigo_received_bytes", "Bytes of the instances received.", registry=r
        )
        self.uploaded_bytes = Counter(
            "dirigo_uploaded_bytes", "Bytes of the study parts sent to the cloud.", registry=r
        )
        self.retrieved_bytes = Counter(
            "dirigo_retrieved_bytes", "Bytes of the instances fetched from the cloud.", registry=r
        )
        self.upload_seconds = Histogram(
            "dirigo_upload_duration_seconds",
            "Seconds to send one study part (packing included).",
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.retrieve_seconds = Histogram(
            "dirigo_retrieve_duration_seconds",
            "Seconds to fetch one instance from the cloud archive.",
            buckets=RETRIEVE_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "dirigo_upload_retries", "Failed upload attempts that will be retried.", registry=r
        )
        self.codecs = Counter(
            "dirigo_upload_codec_chosen",
            "Study parts packed, by the lossless codec used (none: zstd alone).",
            ["codec"],
            registry=r,
        )
        self._lock = threading.Lock()
        self.last_upload: float | None = None
        self.last_retrieve: float | None = None

    def read_state(self, state: Callable[[], State]) -> None:
        """Expose the gauges `state()` returns, read at every scrape."""
        self.registry.register(StateCollector(state))

    def read_audit(self, status: Callable[[], dict[str, Any] | None]) -> None:
        """Expose the audit sender's counts, read from `status()` (an `Auditor.status`) at
        every scrape."""
        self.registry.register(AuditCollector(status))

    def instance_received(self, size: int) -> None:
        self.received.inc()
        self.received_bytes.inc(size)

    def instance_rejected(self, reason: str, quarantined: bool) -> None:
        self.rejected.labels(reason=reason).inc()
        if quarantined:
            self.quarantined.inc()

    def part_uploaded(self, size: int, seconds: float) -> None:
        self.uploaded_bytes.inc(size)
        self.upload_seconds.observe(seconds)
        with self._lock:
            self.last_upload = time.time()

    def codec_chosen(self, codec: str) -> None:
        self.codecs.labels(codec=codec).inc()

    def upload_retry(self) -> None:
        self.retries.inc()

    def instance_retrieved(self, size: int, seconds: float) -> None:
        self.retrieved_bytes.inc(size)
        self.retrieve_seconds.observe(seconds)
        with self._lock:
            self.last_retrieve = time.time()

    def exposition(self) -> bytes:
        """Return every metric in the Prometheus text format."""
        return generate_latest(self.registry)


class StateCollector(Collector):
    """The gauges read at scrape time from `state()`."""

    def __init__(self, state: Callable[[], State]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        yield _by_label("dirigo_studies", "Study parts by state.", "state", state.studies)
        yield _by_label("dirigo_queue_instances", "Instances by state.", "state", state.instances)
        yield _by_label("dirigo_queue_jobs", "Jobs by state.", "state", state.jobs)
        yield _by_label(
            "dirigo_associations_active",
            "Open DICOM associations by service.",
            "service",
            state.associations,
        )
        oldest = GaugeMetricFamily(
            "dirigo_oldest_unsent_study_age_seconds",
            "Seconds since the oldest study part not yet in the cloud began to arrive (0: none).",
        )
        oldest.add_metric([], state.oldest_unsent_age or 0.0)
        yield oldest
        yield GaugeMetricFamily(
            "dirigo_disk_free_bytes", "Free bytes on data_dir's file system.", state.disk_free
        )
        yield GaugeMetricFamily(
            "dirigo_disk_size_bytes", "Size of data_dir's file system.", state.disk_total
        )
        if state.cloud_up is not None:
            yield GaugeMetricFamily(
                "dirigo_cloud_up",
                "1 if the cloud answered the latest probe, else 0.",
                1.0 if state.cloud_up else 0.0,
            )
        info = InfoMetricFamily("dirigo_build", "The agent's version.")
        info.add_metric([], {"version": __version__})
        yield info


class AuditCollector(Collector):
    """The audit trail's syslog sender, read at scrape time (nothing without `audit.syslog`)."""

    def __init__(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        if status is None:
            return
        yield CounterMetricFamily(
            "dirigo_audit_messages_sent", "Audit messages sent to syslog.", status["sent"]
        )
        yield CounterMetricFamily(
            "dirigo_audit_messages_dropped",
            "Audit messages not sent to syslog (its queue was full, or held them at stop);"
            " each one is still in the database.",
            status["dropped"],
        )
        yield GaugeMetricFamily(
            "dirigo_audit_queue_messages", "Audit messages waiting for syslog.", status["queued"]
        )
        yield GaugeMetricFamily(
            "dirigo_audit_syslog_up",
            "0 while sending to the syslog collector fails, else 1.",
            0.0 if status["failing"] else 1.0,
        )


def _by_label(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family
