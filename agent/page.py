"""The status page (`GET /` of the health server): one self-contained HTML document for people.

Health lights, the queue by state, the oldest study still waiting, charts of what came in and went
out over the last hour and day (inline SVG), the latest studies and the latest problems with their
next attempt. No external asset and no script library: the page is rendered here, whole, and a few
lines of plain JavaScript fetch it again every few seconds and swap its content in place, so it
follows the agent without a reload (and without JavaScript, a `<noscript>` refresh does).

Everything comes from the `/status` document and the store (`Store.activity`), never from the
process's memory: the charts survive a restart. Nothing on it names a patient: studies are shown
by UID, size and state.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any

from agent.config.units import rough_duration
from agent.health import fetch_syntax_line
from agent.store import Bucket, PartSummary, Problem, Store
from agent.store.activity import bucket_start

REFRESH_SECONDS = 5
RECENT_PARTS = 15
RECENT_PROBLEMS = 10
CHARTS = (("last hour", 60.0, 60), ("last day", 1800.0, 48))
"""Each chart: its title, the width of a bar in seconds and how many bars."""


def activity(store: Store, now: float) -> dict[str, Any]:
    """Return what the page shows besides the `/status` document: the throughput charts'
    buckets, the latest study parts, the oldest part still waiting and the latest problems."""
    return {
        "charts": [
            {
                "title": title,
                "width": width,
                "buckets": store.activity.throughput(bucket_start(now, width, count), width, count),
            }
            for title, width, count in CHARTS
        ],
        "recent": store.activity.recent_parts(RECENT_PARTS),
        "oldest_waiting": store.activity.oldest_waiting(),
        "problems": store.activity.problems(RECENT_PROBLEMS),
    }


def status_page(status: dict[str, Any], store: Store, now: float) -> str:
    """Return the page for the `/status` document `status`, with the store's recent activity."""
    return render(status, activity(store, now), now)


def render(status: dict[str, Any], seen: dict[str, Any], now: float) -> str:
    """Return the whole HTML document for `status` (the `/status` document) and `seen` (what
    `activity` returns) at time `now`."""
    site = escape(str(status.get("site", "")))
    body = "\n".join(
        [
            _lights(status),
            '<div class="grid">',
            _queue(status, now),
            _oldest(seen["oldest_waiting"], now),
            "</div>",
            '<div class="grid">',
            *(_chart(chart) for chart in seen["charts"]),
            "</div>",
            _uploads(status),
            _problems(status, seen["problems"], now),
            _recent(seen["recent"], now),
        ]
    )
    return _PAGE.format(
        site=site,
        summary=_summary(status, now),
        icon=_icon(status),
        refresh=REFRESH_SECONDS,
        style=_STYLE,
        script=_SCRIPT.replace("REFRESH_MS", str(REFRESH_SECONDS * 1000)),
        body=body,
    )


def _icon(status: dict[str, Any]) -> str:
    """Return the tab's icon, inline (the page loads nothing else): a dot of the state's colour."""
    colour = {"healthy": "1e9e5a", "degraded": "e0a100", "unhealthy": "d4351c"}
    fill = colour.get(str(status.get("state")), "6b7384")
    return (
        "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E"
        f"%3Ccircle cx='8' cy='8' r='7' fill='%23{fill}'/%3E%3C/svg%3E"
    )


def _summary(status: dict[str, Any], now: float) -> str:
    words = [f"version {escape(str(status.get('version', '')))}"]
    if "uptime_seconds" in status:
        words.append(f"up {_ago(float(status['uptime_seconds']))}")
    words.append(f"updated {_utc(now)}")
    state = status.get("state")
    badge = ""
    if isinstance(state, str):
        state = escape(state)
        badge = f'<span class="badge {state}" data-state="{state}">{state}</span> '
    return badge + " · ".join(words)


# -- health lights ----------------------------------------------------------------------------


def lights(status: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Return (name, level, words) for each light: level is `ok`, `warn`, `bad` or `unknown`."""
    found = []
    health = status.get("health")
    if isinstance(health, dict):
        failing = [str(name) for name in health.get("failing", [])]
        healthy = health.get("healthy", not failing)
        if not failing:
            found.append(("agent", "ok", "all parts running"))
        else:
            # Healthy with a failing part: only parts a restart would not cure (watch folders).
            found.append(("agent", "warn" if healthy else "bad", "failing: " + ", ".join(failing)))
    disk = status["disk"]
    readiness = status.get("readiness")
    unready = []
    if isinstance(readiness, dict):
        checks = readiness.get("checks", {})
        unready = [str(c.get("problem") or name) for name, c in checks.items() if not c.get("ok")]
    if unready:
        found.append(("receiving", "bad", "refusing: " + "; ".join(unready)))
    elif disk["accepting"]:
        found.append(("receiving", "ok", f"disk {disk['used_percent']}% used"))
    else:
        found.append(("receiving", "bad", f"refusing: disk above {disk['high_water_percent']}%"))
    cloud = status.get("cloud")
    if isinstance(cloud, dict) and "up" in cloud:
        level = {True: "ok", False: "warn"}.get(cloud["up"], "unknown")
        found.append(("cloud", level, _cloud_words(cloud)))
    failed = status["failed"]
    stuck = [item for item in failed if item["next_attempt_at"] is None]
    if stuck:
        found.append(("uploads", "bad", f"{len(stuck)} need an operator"))
    elif failed:
        found.append(("uploads", "warn", f"{len(failed)} retrying"))
    else:
        found.append(("uploads", "ok", f"{len(status['uploads'])} sending now"))
    return found


def _cloud_words(cloud: dict[str, Any]) -> str:
    if cloud["up"] is None:
        return "not asked yet"
    if cloud["up"]:
        return "reachable"
    error = cloud.get("error")
    return "unreachable: stored here, sent later" + (f" ({error})" if error else "")


def _lights(status: dict[str, Any]) -> str:
    items = "".join(
        f'<li class="light {level}" data-light="{escape(name)}" data-level="{level}">'
        f'<span class="dot"></span><b>{escape(name)}</b> <span>{escape(words)}</span></li>'
        for name, level, words in lights(status)
    )
    return f'<ul class="lights">{items}</ul>'


# -- queue and oldest study -------------------------------------------------------------------


def _queue(status: dict[str, Any], now: float) -> str:
    rows = []
    for group in ("studies", "instances", "jobs"):
        counts = status[group]
        cells = "".join(
            f'<td><span class="n" data-count="{group}.{escape(state)}">{count}</span>'
            f'<span class="state">{escape(state)}</span></td>'
            for state, count in counts.items()
        )
        rows.append(f"<tr><th>{group}</th>{cells}</tr>")
    return (
        '<section class="card"><h2>Queue by state</h2>'
        f'<table class="counts">{"".join(rows)}</table>{_last_transfers(status, now)}</section>'
    )


def _last_transfers(status: dict[str, Any], now: float) -> str:
    """Return when the last upload and the last retrieve succeeded, where `/status` says."""
    words = []
    for key, what in (("last_upload_at", "upload"), ("last_retrieve_at", "retrieve")):
        if key in status:
            at = status[key]
            when = "none since start-up" if at is None else f"{_ago(now - _epoch(at))} ago"
            mark = escape(at or "")
            words.append(f'last {what} <span data-{what}="{mark}">{when}</span>')
    retrieve = status.get("retrieve")
    if isinstance(retrieve, dict) and "fetch_syntax" in retrieve:
        choice = retrieve["fetch_syntax"]
        asks = escape(choice["asks"]) if choice else ""
        line = escape(fetch_syntax_line(choice))
        words.append(f'retrieve <span data-fetch-syntax="{asks}">{line}</span>')
    return f'<p class="quiet">{" · ".join(words)}</p>' if words else ""


def _oldest(part: PartSummary | None, now: float) -> str:
    if part is None:
        inner = (
            '<p class="quiet" data-oldest="none">Nothing is waiting: the cloud holds it all.</p>'
        )
    else:
        since = part.first_received_at or now
        inner = (
            f'<p class="big" data-oldest="{escape(part.study_uid)}">{_ago(now - since)}</p>'
            f'<p><span class="uid">{escape(part.study_uid)}</span> part {part.part}<br>'
            f"{_state(part.state)} · {part.instances} instances · {_bytes(part.bytes)}"
            f"<br>first instance {_utc(since)}</p>"
        )
    return f'<section class="card"><h2>Oldest waiting study</h2>{inner}</section>'


# -- charts -----------------------------------------------------------------------------------

_W, _H, _PAD_L, _PAD_B, _PAD_T = 560, 170, 52, 22, 10


def _chart(chart: dict[str, Any]) -> str:
    buckets: list[Bucket] = chart["buckets"]
    width: float = chart["width"]
    top = _nice(max([b.received_bytes for b in buckets] + [b.sent_bytes for b in buckets] + [1]))
    plot_w, plot_h = _W - _PAD_L - 6, _H - _PAD_B - _PAD_T
    step = plot_w / len(buckets)
    bar = max(step / 2 - 0.5, 0.5)
    shapes = []
    for i, b in enumerate(buckets):
        x = _PAD_L + i * step
        label = (
            f"{_utc(b.start)}: in {b.received} ({_bytes(b.received_bytes)}),"
            f" out {b.sent} ({_bytes(b.sent_bytes)})"
        )
        for offset, size, css in ((0.0, b.received_bytes, "in"), (bar, b.sent_bytes, "out")):
            h = plot_h * size / top
            shapes.append(
                f'<rect class="{css}" x="{x + offset:.1f}" y="{_PAD_T + plot_h - h:.1f}"'
                f' width="{bar:.1f}" height="{h:.1f}"><title>{escape(label)}</title></rect>'
            )
    grid = []
    for fraction in (0.0, 0.5, 1.0):
        y = _PAD_T + plot_h * (1 - fraction)
        grid.append(
            f'<line class="grid" x1="{_PAD_L}" x2="{_W - 6}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{_PAD_L - 4}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_bytes(top * fraction)}</text>"
        )
    ticks = []
    every = max(len(buckets) // 6, 1)
    for i in range(0, len(buckets), every):
        x = _PAD_L + i * step
        ticks.append(
            f'<text class="axis" x="{x:.1f}" y="{_H - 6}">'
            f"{datetime.fromtimestamp(buckets[i].start, UTC):%H:%M}</text>"
        )
    received = sum(b.received for b in buckets)
    sent = sum(b.sent for b in buckets)
    per = "minute" if width == 60 else f"{width / 60:.0f} minutes"
    return (
        f'<section class="card"><h2>{escape(chart["title"])}'
        f' <small><span class="swatch in"></span> in <span class="swatch out"></span> out,'
        f" bytes per {per} (UTC)</small></h2>"
        f'<svg viewBox="0 0 {_W} {_H}" role="img" data-received="{received}" data-sent="{sent}"'
        f' aria-label="{escape(chart["title"])}: {received} instances in, {sent} out">'
        f"{''.join(grid)}{''.join(shapes)}{''.join(ticks)}</svg>"
        f'<p class="quiet">{received} instances in, {sent} out</p></section>'
    )


def _nice(value: float) -> float:
    """Return a round number at least `value` (1, 2 or 5 times a power of ten) for an axis."""
    power = 1.0
    while power * 10 <= value:
        power *= 10
    for factor in (1, 2, 5, 10):
        if power * factor >= value:
            return power * factor
    return power * 10


# -- tables -----------------------------------------------------------------------------------


def _uploads(status: dict[str, Any]) -> str:
    if not status["uploads"]:
        return ""
    rows = "".join(
        f'<tr><td class="uid">{escape(u["study_uid"])}</td><td>{u["part"]}</td>'
        f"<td>{_progress(u)}</td><td>{_bytes(u['rate_bytes_per_s'])}/s</td></tr>"
        for u in status["uploads"]
    )
    return (
        '<section class="card"><h2>Sending now</h2><table class="list">'
        f"<tr><th>study</th><th>part</th><th>sent</th><th>rate</th></tr>{rows}</table></section>"
    )


def _progress(upload: dict[str, Any]) -> str:
    total = upload["bytes_total"]
    if not total:
        return "packing"
    done = upload["bytes_sent"]
    return (
        f'<meter min="0" max="{total}" value="{done}"></meter> '
        f"{_bytes(done)} of {_bytes(total)} ({100 * done // total}%)"
    )


def _problems(status: dict[str, Any], problems: list[Problem], now: float) -> str:
    failed = "".join(
        f'<tr class="{"bad" if item["next_attempt_at"] is None else "warn"}" data-failed-job='
        f'"{item["id"]}"><td>job {item["id"]}</td><td class="uid">{escape(item["study_uid"])}'
        f" part {item['part']}</td><td>{item['attempts']}</td>"
        f"<td>{escape(str(item['last_error']))}</td><td>{_next(item, now)}</td></tr>"
        for item in status["failed"]
    )
    events = "".join(
        f'<tr class="{"bad" if p.level == "error" else "warn"}"><td>{_utc(p.at)}</td>'
        f"<td>{escape(p.kind)}</td><td>{escape(p.message)}</td></tr>"
        for p in problems
    )
    parts = ['<section class="card"><h2>Problems</h2>']
    if failed:
        parts.append(
            '<table class="list"><tr><th>failed</th><th>study</th><th>attempts</th>'
            f"<th>last error</th><th>next attempt</th></tr>{failed}</table>"
        )
    if events:
        parts.append(
            '<table class="list"><tr><th>when</th><th>what</th><th>message</th></tr>'
            f"{events}</table>"
        )
    if not failed and not events:
        parts.append('<p class="quiet">No failed job, no warning, no error.</p>')
    parts.append("</section>")
    return "".join(parts)


def _next(item: dict[str, Any], now: float) -> str:
    if item["next_attempt_at"] is None:
        return f"never by itself: <code>dirigo queue retry {item['id']}</code>"
    at = _epoch(item["next_attempt_at"])
    return "due now" if at <= now else f"in {_ago(at - now)}"


def _recent(parts: list[PartSummary], now: float) -> str:
    if not parts:
        return (
            '<section class="card"><h2>Recent studies</h2><p class="quiet">None yet.</p></section>'
        )
    rows = "".join(
        f'<tr data-study="{escape(p.study_uid)}"><td class="uid">{escape(p.study_uid)}</td>'
        f"<td>{p.part}</td><td>{_state(p.state)}</td><td>{p.instances}</td>"
        f"<td>{_bytes(p.bytes)}</td><td>{_ago(now - (p.last_received_at or now))} ago</td></tr>"
        for p in parts
    )
    return (
        '<section class="card"><h2>Recent studies</h2><table class="list"><tr><th>study</th>'
        "<th>part</th><th>state</th><th>instances</th><th>size</th><th>last instance</th></tr>"
        f"{rows}</table></section>"
    )


# -- words ------------------------------------------------------------------------------------


def _state(state: str) -> str:
    return f'<span class="st {escape(state)}">{escape(state)}</span>'


def _bytes(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def _ago(seconds: float) -> str:
    return rough_duration(max(seconds, 0.0))


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _utc(epoch: float) -> str:
    return f"{datetime.fromtimestamp(epoch, UTC):%Y-%m-%d %H:%M:%S} UTC"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Dirigo · {site}</title>
<link rel="icon" href="{icon}">
<noscript><meta http-equiv="refresh" content="{refresh}"></noscript>
<style>{style}</style></head>
<body><header><h1>Dirigo <span>{site}</span></h1>
<p id="summary">{summary}</p></header>
<main id="content">{body}</main>
<script>{script}</script></body></html>
"""

_STYLE = """
:root{--ok:#1e9e5a;--warn:#e0a100;--bad:#d4351c;--in:#2f6fd6;--out:#1e9e5a;--ink:#1d2330;
--muted:#6b7384;--line:#e3e6ec;--bg:#f4f6f9}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,
sans-serif;color:var(--ink);background:var(--bg)}
header{display:flex;justify-content:space-between;align-items:baseline;padding:12px 24px;
background:#1d2330;color:#fff}header h1{margin:0;font-size:20px}header h1 span{color:#9fb3d9;
font-weight:400;margin-left:8px}header p{margin:0;color:#9fb3d9}header.stale{background:var(--bad)}
.badge{border-radius:10px;padding:2px 10px;font-weight:600;color:#fff;background:#6b7384}
.badge.healthy{background:var(--ok)}.badge.degraded{background:var(--warn)}
.badge.unhealthy{background:var(--bad)}
main{padding:16px 24px;max-width:1280px;margin:auto}
.lights{display:flex;flex-wrap:wrap;gap:12px;list-style:none;padding:0;margin:0 0 16px}
.light{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 14px;
display:flex;gap:8px;align-items:center}.light b{text-transform:capitalize}
.dot{width:12px;height:12px;border-radius:50%;background:#aab}.ok .dot{background:var(--ok)}
.warn .dot{background:var(--warn)}.bad .dot{background:var(--bad)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px;
margin-bottom:16px}.card{background:#fff;border:1px solid var(--line);border-radius:8px;
padding:12px 16px;margin-bottom:16px}.grid .card{margin:0}
h2{font-size:15px;margin:0 0 8px}h2 small{font-weight:400;color:var(--muted);margin-left:8px}
.counts{border-collapse:collapse;width:100%}.counts th{text-align:left;padding:6px 8px 6px 0;
color:var(--muted);font-weight:500}.counts td{padding:4px 8px}.n{display:block;font-size:20px;
font-weight:600}.state{color:var(--muted);font-size:12px}
.big{font-size:28px;font-weight:600;margin:4px 0}.quiet{color:var(--muted)}
.uid{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
.list{border-collapse:collapse;width:100%}.list th{text-align:left;color:var(--muted);
font-weight:500;border-bottom:1px solid var(--line);padding:4px 8px}.list td{padding:4px 8px;
border-bottom:1px solid var(--line);vertical-align:top}tr.bad td:first-child{border-left:3px solid
var(--bad)}tr.warn td:first-child{border-left:3px solid var(--warn)}
.st{border-radius:10px;padding:1px 8px;font-size:12px;background:#e8ecf3}.st.confirmed,.st.sent
{background:#dff3e8}.st.uploading{background:#e1ebfb}
svg{width:100%;height:auto}svg .in,.swatch.in{fill:var(--in);background:var(--in)}
svg .out,.swatch.out{fill:var(--out);background:var(--out)}.swatch{display:inline-block;
width:10px;height:10px;border-radius:2px}svg .grid{stroke:var(--line)}
svg .axis{fill:var(--muted);font-size:10px}meter{width:120px}
"""

_SCRIPT = """
(function () {
  var header = document.querySelector("header");
  function swap(fresh, selector) {
    document.querySelector(selector).innerHTML = fresh.querySelector(selector).innerHTML;
  }
  function refresh() {
    if (document.hidden) {  // a tab nobody looks at asks nothing
      window.setTimeout(refresh, REFRESH_MS);
      return;
    }
    var control = new AbortController();
    var timer = window.setTimeout(function () { control.abort(); }, 3 * REFRESH_MS);
    fetch(window.location.href,
          {cache: "no-store", credentials: "same-origin", signal: control.signal})
      .then(function (answer) {
        if (!answer.ok) { throw new Error("HTTP " + answer.status); }
        return answer.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html");
        swap(fresh, "#content");
        swap(fresh, "#summary");
        document.querySelector("link[rel=icon]").setAttribute("href",
          fresh.querySelector("link[rel=icon]").getAttribute("href"));
        header.classList.remove("stale");
      })
      .catch(function (error) {
        var why = error.name === "AbortError" ? "no answer" : error.message;
        header.classList.add("stale");
        document.querySelector("#summary").textContent =
          "cannot reach the agent (" + why + "): what follows is old; trying again";
      })
      .then(function () {
        window.clearTimeout(timer);
        window.setTimeout(refresh, REFRESH_MS);
      });
  }
  window.setTimeout(refresh, REFRESH_MS);
})();
"""
