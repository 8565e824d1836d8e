"""The status page: the activity it reads from the store, and the HTML it renders."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from agent import page
from agent.config import parse_config
from agent.health import snapshot
from agent.serve.fetchsyntax import SyntaxChooser
from agent.serve.query import InstanceRef
from agent.spool import Spool
from agent.store import UPLOAD, NewInstance, Store
from agent.store.activity import bucket_start
from agent.store.choices import FETCH_SYNTAX

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
HOUR = 3600.0
NOW = 1_800_000_000.0  # a multiple of 60 and of 1800


def receive(store: Store, study: str, sop: str, size: int, at: float) -> None:
    new = NewInstance(sop, CT, study, study + ".1", EXPLICIT, f"spool/{sop}", size, sop, "PACS")
    store.record_instance(new, at)


def send_all(store: Store, at: float) -> None:
    """Close every open part at `at` and mark each one sent at `at`."""
    store.mark_stable(at, stable_after=0)
    while (job := store.jobs.claim(UPLOAD, "w1", 60, now=at)) is not None:
        store.uploads.begin_attempt(job.study_id, job.lease, at)
        store.uploads.mark_sent(job.study_id, job.lease, at)
        store.jobs.complete(job.lease, at)


def status_of(store: Store, tmp_path: Path, high_water: float = 100.0) -> dict[str, Any]:
    settings = parse_config(
        {
            "site": "hospital-a",
            "data_dir": str(tmp_path / "data"),
            "cloud": {"upload_url": "https://x.example/files/"},
        }
    )
    spool = Spool(settings.data_dir, high_water)  # 0: any disk is above it
    spool.prepare()
    return snapshot(settings, store, spool)


def test_throughput_counts_instances_in_by_arrival_and_out_by_the_time_their_part_was_sent(
    store: Store,
) -> None:
    start = NOW - 10 * 60
    receive(store, "1.9.1", "1.9.1.1", 1000, start + 5)
    receive(store, "1.9.1", "1.9.1.2", 3000, start + 50)
    receive(store, "1.9.2", "1.9.2.1", 500, start + 125)
    send_all(store, start + 190)  # the third minute

    buckets = store.activity.throughput(start, 60.0, 10)

    assert len(buckets) == 10
    assert [b.start for b in buckets] == [start + 60 * i for i in range(10)]
    assert (buckets[0].received, buckets[0].received_bytes) == (2, 4000)
    assert (buckets[2].received, buckets[2].received_bytes) == (1, 500)
    assert (buckets[3].sent, buckets[3].sent_bytes) == (3, 4500)
    assert sum(b.sent for b in buckets) == 3
    assert sum(b.received for b in buckets) == 3
    # Outside the window nothing is counted.
    assert store.activity.throughput(start + 600, 60.0, 5) == [
        type(buckets[0])(start + 600 + 60 * i, 0, 0, 0, 0) for i in range(5)
    ]


def test_throughput_history_survives_a_restart(db_path: Path) -> None:
    store = Store.open(db_path)
    receive(store, "1.9.1", "1.9.1.1", 1000, NOW - 30)
    send_all(store, NOW - 10)
    before = store.activity.throughput(bucket_start(NOW, 60.0, 60), 60.0, 60)
    store.close()

    reopened = Store.open(db_path)
    try:
        after = reopened.activity.throughput(bucket_start(NOW, 60.0, 60), 60.0, 60)
    finally:
        reopened.close()

    assert after == before
    assert sum(b.received for b in after) == 1
    assert sum(b.sent for b in after) == 1


def test_buckets_end_with_the_one_holding_now_and_stay_put_between_refreshes() -> None:
    assert bucket_start(NOW + 59, 60.0, 60) == NOW - 59 * 60
    assert bucket_start(NOW + 1, 60.0, 60) == bucket_start(NOW + 30, 60.0, 60)


def test_oldest_waiting_is_the_part_not_in_the_cloud_that_arrived_first(store: Store) -> None:
    assert store.activity.oldest_waiting() is None
    receive(store, "1.9.1", "1.9.1.1", 10, NOW - 3 * HOUR)
    send_all(store, NOW - 2 * HOUR)
    receive(store, "1.9.2", "1.9.2.1", 20, NOW - HOUR)
    receive(store, "1.9.2", "1.9.2.2", 30, NOW - 60)
    receive(store, "1.9.3", "1.9.3.1", 40, NOW - 30)

    oldest = store.activity.oldest_waiting()

    assert oldest is not None
    assert (oldest.study_uid, oldest.part, oldest.state) == ("1.9.2", 1, "open")
    assert (oldest.instances, oldest.bytes, oldest.first_received_at) == (2, 50, NOW - HOUR)


def test_recent_parts_are_newest_first_with_their_instances_and_bytes(store: Store) -> None:
    receive(store, "1.9.1", "1.9.1.1", 10, NOW - 90)
    receive(store, "1.9.2", "1.9.2.1", 20, NOW - 60)
    receive(store, "1.9.1", "1.9.1.2", 30, NOW - 30)

    recent = store.activity.recent_parts(10)

    assert [(p.study_uid, p.instances, p.bytes) for p in recent] == [
        ("1.9.1", 2, 40),
        ("1.9.2", 1, 20),
    ]
    assert [p.study_uid for p in store.activity.recent_parts(1)] == ["1.9.1"]


def test_the_page_shows_the_counts_of_the_status_document(store: Store, tmp_path: Path) -> None:
    receive(store, "1.9.1", "1.9.1.1", 10, NOW - 90)
    receive(store, "1.9.2", "1.9.2.1", 20, NOW - 60)
    send_all(store, NOW - 50)
    receive(store, "1.9.3", "1.9.3.1", 30, NOW - 10)
    status = status_of(store, tmp_path)

    html = page.status_page(status, store, NOW)

    shown = {
        key: int(value) for key, value in re.findall(r'data-count="([a-z]+\.[a-z]+)">(\d+)<', html)
    }
    expected = {
        f"{group}.{state}": count
        for group in ("studies", "instances", "jobs")
        for state, count in status[group].items()
    }
    assert shown == expected
    assert shown["studies.sent"] == 2 and shown["studies.open"] == 1
    assert 'data-received="3" data-sent="2"' in html  # the last hour's chart
    assert 'data-oldest="1.9.3"' in html
    assert 'data-study="1.9.1"' in html


def test_the_page_is_self_contained(store: Store, tmp_path: Path) -> None:
    html = page.status_page(status_of(store, tmp_path), store, NOW)

    assert html.startswith("<!DOCTYPE html>")
    # The one reference is the tab's icon, inline as a data: URI.
    icon = re.search(r'<link rel="icon" href="data:[^"]*">', html)
    assert icon is not None
    inline = html.replace(icon[0], "")
    assert not re.search(r"""(src|href)\s*=|@import|url\(|https?://""", inline)


def test_the_page_escapes_what_it_shows(store: Store, tmp_path: Path) -> None:
    status = status_of(store, tmp_path)
    status["site"] = "<b>site</b>"
    status["failed"] = [
        {
            "id": 7,
            "kind": "upload",
            "study_uid": "1.2<script>",
            "part": 1,
            "attempts": 3,
            "last_error": "<script>alert(1)</script>",
            "next_attempt_at": None,
        }
    ]

    html = page.status_page(status, store, NOW)

    assert "<script>alert" not in html and "1.2<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "dirigo queue retry 7" in html


def test_lights_name_what_is_wrong(store: Store, tmp_path: Path) -> None:
    healthy = status_of(store, tmp_path)
    assert {name: level for name, level, _ in page.lights(healthy)} == {
        "receiving": "ok",
        "uploads": "ok",
    }

    full = status_of(store, tmp_path, high_water=0.0)
    full["failed"] = [{"id": 1, "next_attempt_at": "2026-01-01T00:00:00+00:00"}]
    full["cloud"] = {"up": False, "error": "connection refused"}
    full["health"] = {"healthy": False, "failing": ["upload worker 2"]}
    levels = {name: (level, words) for name, level, words in page.lights(full)}

    assert levels["receiving"][0] == "bad"
    assert levels["uploads"] == ("warn", "1 retrying")
    assert levels["cloud"][0] == "warn" and "connection refused" in levels["cloud"][1]
    assert levels["agent"] == ("bad", "failing: upload worker 2")

    full["health"] = {"healthy": True, "failing": ["watch"]}
    levels = {name: (level, words) for name, level, words in page.lights(full)}
    assert levels["agent"] == ("warn", "failing: watch")


def test_an_unready_agent_says_why_and_its_state_is_in_the_header(
    store: Store, tmp_path: Path
) -> None:
    status = status_of(store, tmp_path)
    status["state"] = "unhealthy"
    status["uptime_seconds"] = 7200.0
    status["readiness"] = {
        "ready": False,
        "checks": {
            "store": {"ok": True, "problem": None},
            "dicom": {"ok": False, "problem": "the DICOM port is closed"},
        },
    }

    levels = {name: (level, words) for name, level, words in page.lights(status)}
    html = page.status_page(status, store, NOW)

    assert levels["receiving"] == ("bad", "refusing: the DICOM port is closed")
    assert 'data-state="unhealthy"' in html
    assert "up 2h" in html


def test_a_cloud_not_asked_yet_is_unknown_and_the_last_transfers_are_shown(
    store: Store, tmp_path: Path
) -> None:
    status = status_of(store, tmp_path)
    status["cloud"] = {"up": None}
    status["last_upload_at"] = "2027-01-15T08:00:00+00:00"
    status["last_retrieve_at"] = None
    now = datetime.fromisoformat("2027-01-15T08:07:00+00:00").timestamp()

    levels = {name: (level, words) for name, level, words in page.lights(status)}
    html = page.status_page(status, store, now)

    assert levels["cloud"] == ("unknown", "not asked yet")
    assert '<span data-upload="2027-01-15T08:00:00+00:00">7min ago</span>' in html
    assert '<span data-retrieve="">none since start-up</span>' in html


def test_problems_are_the_failed_jobs_with_their_next_attempt_and_the_latest_warnings(
    store: Store, tmp_path: Path
) -> None:
    receive(store, "1.9.1", "1.9.1.1", 10, NOW - 600)
    store.mark_stable(NOW - 500, stable_after=0)
    job = store.jobs.claim(UPLOAD, "w1", 60, now=NOW - 400)
    assert job is not None
    store.jobs.fail(job.lease, "the cloud refused: HTTP 503", NOW + 300, NOW - 300)
    store.jobs.requeue_expired(NOW)  # nothing to requeue: no event
    store.record_quarantine("dataset is truncated at byte 12", "quarantine/q1", "PACS", None, NOW)

    problems = store.activity.problems(10)
    html = page.status_page(status_of(store, tmp_path), store, NOW)

    assert [(p.level, p.kind) for p in problems] == [
        ("error", "quarantined"),
        ("warning", "upload_failed"),
    ]
    failed_row = re.search(r'<tr class="warn" data-failed-job="\d+">.*?</tr>', html)
    assert failed_row is not None
    assert "the cloud refused: HTTP 503" in failed_row[0] and "in 5min" in failed_row[0]
    assert "dataset is truncated at byte 12" in html
    assert store.activity.problems(1) == problems[:1]


def test_the_syntax_retrieval_asks_the_archive_for_is_shown_with_why(
    store: Store, tmp_path: Path
) -> None:
    before = page.status_page(status_of(store, tmp_path), store, NOW)
    choice = SyntaxChooser("auto")
    choice.fetched(
        InstanceRef("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", None),
        "*",
        ExplicitVRLittleEndian,
        1_000_000,
        1.0,
    )  # 8 Mbit/s: slow
    store.choices.record(FETCH_SYNTAX, choice.choice().document(), NOW)
    after = page.status_page(status_of(store, tmp_path), store, NOW)

    assert '<span data-fetch-syntax="">nothing fetched yet</span>' in before
    assert f'<span data-fetch-syntax="{JPEGLSLossless}">fetching as JPEG-LS Lossless' in after
    assert "the link measured 8.0 Mbit/s, below 100 Mbit/s" in after
