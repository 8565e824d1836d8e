"""The metrics' exposition: names with the dirigo_ prefix and base units, labels without PHI."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import Metrics, State


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def state(cloud_up: bool | None) -> State:
    return State(
        studies={"open": 2, "sent": 1},
        instances={"received": 7},
        jobs={"failed": 1},
        oldest_unsent_age=42.0,
        disk_free=1000,
        disk_total=4000,
        associations={"store": 1, "find": 0},
        cloud_up=cloud_up,
    )


def test_events_are_counted_in_base_units() -> None:
    metrics = Metrics()
    metrics.instance_received(1500)
    metrics.instance_received(500)
    metrics.instance_rejected("cannot_understand", quarantined=True)
    metrics.instance_rejected("out_of_resources", quarantined=False)
    metrics.part_uploaded(10_000, 3.5)
    metrics.upload_retry()
    metrics.instance_retrieved(2000, 0.02)
    found = samples(metrics)
    assert found[("dirigo_instances_received_total", ())] == 2
    assert found[("dirigo_received_bytes_total", ())] == 2000
    assert found[("dirigo_instances_rejected_total", (("reason", "cannot_understand"),))] == 1
    assert found[("dirigo_instances_rejected_total", (("reason", "out_of_resources"),))] == 1
    assert found[("dirigo_instances_quarantined_total", ())] == 1
    assert found[("dirigo_uploaded_bytes_total", ())] == 10_000
    assert found[("dirigo_upload_duration_seconds_count", ())] == 1
    assert found[("dirigo_upload_duration_seconds_bucket", (("le", "5.0"),))] == 1
    assert found[("dirigo_upload_retries_total", ())] == 1
    assert found[("dirigo_retrieved_bytes_total", ())] == 2000
    assert found[("dirigo_retrieve_duration_seconds_sum", ())] == 0.02
    assert metrics.last_upload is not None and metrics.last_retrieve is not None


def test_state_gauges_are_read_at_each_scrape() -> None:
    metrics = Metrics()
    current = {"cloud_up": None}
    metrics.read_state(lambda: state(current["cloud_up"]))
    found = samples(metrics)
    assert found[("dirigo_studies", (("state", "open"),))] == 2
    assert found[("dirigo_queue_instances", (("state", "received"),))] == 7
    assert found[("dirigo_queue_jobs", (("state", "failed"),))] == 1
    assert found[("dirigo_oldest_unsent_study_age_seconds", ())] == 42
    assert found[("dirigo_disk_free_bytes", ())] == 1000
    assert found[("dirigo_associations_active", (("service", "store"),))] == 1
    assert ("dirigo_cloud_up", ()) not in found  # not probed yet
    current["cloud_up"] = False
    assert samples(metrics)[("dirigo_cloud_up", ())] == 0
    assert any(name == "dirigo_build_info" for name, _ in found)


def test_every_metric_has_the_dirigo_prefix() -> None:
    metrics = Metrics()
    metrics.read_state(lambda: state(True))
    families = text_string_to_metric_families(metrics.exposition().decode())
    assert all(family.name.startswith("dirigo_") for family in families)
