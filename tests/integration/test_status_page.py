"""The status page (`GET /` of the health server) in a real headless browser: Debian's chromium,
driven by chromium-driver through selenium, against the real `dirigo run`, a real tus server and
DCMTK's storescu.

Set DIRIGO_PAGE_SCREENSHOT to a path to keep a copy of the screenshot there as well (the README's
`docs/status-page.png` is made that way).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.support import datasets, dcmtk
from tests.support.agent import Agent
from tests.support.net import LOOPBACK, free_port, wait_until
from tests.support.tus import TusServer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
GROUPS = ("studies", "instances", "jobs")


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless chromium keeping its console log, at a desktop's window size."""
    for program in (CHROMIUM, CHROMEDRIVER):
        assert Path(program).is_file(), f"{program} is missing: run scripts/setup"
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests may run as root, where chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def shown_counts(driver: webdriver.Chrome) -> dict[str, dict[str, int]]:
    """Return the counts the page shows, by group and state, as `/status` has them."""
    counts: dict[str, dict[str, int]] = {group: {} for group in GROUPS}
    for element in driver.find_elements(By.CSS_SELECTOR, "[data-count]"):
        group, state = element.get_attribute("data-count").split(".")
        counts[group][state] = int(element.text)
    return counts


def status_counts(status: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {group: status[group] for group in GROUPS}


def test_the_status_page_shows_what_status_says_and_follows_a_send_without_a_reload(
    tmp_path: Path,
    tmp_data_dir: Path,
    tus_server: Callable[..., TusServer],
    browser: webdriver.Chrome,
) -> None:
    series = datasets.ct_series(tmp_path / "ct", slices=24, rows=128, cols=128, seed=21)
    first = dcmread(series[0], stop_before_pixels=True)
    study_uid = str(first.StudyInstanceUID)
    tus = tus_server()
    base = f"http://{LOOPBACK}:{free_port()}"
    agent = Agent(
        tmp_data_dir,
        stable_after="2s",
        extra={
            "cloud": {"upload_url": tus.url},
            "health": {"listen": base.removeprefix("http://")},
        },
    )
    with agent:

        def status() -> dict[str, Any]:
            answer = requests.get(f"{base}/status", timeout=10)
            answer.raise_for_status()
            document: dict[str, Any] = answer.json()
            return document

        wait_until(status, 30, what="the health server answering /status")
        page = requests.get(f"{base}/", timeout=10)
        assert page.status_code == 200
        assert page.headers["Content-Type"].startswith("text/html")

        browser.get(f"{base}/")
        assert browser.title == "Dirigo · test-site"
        assert shown_counts(browser) == status_counts(status())
        browser.execute_script("window.notReloaded = true;")

        result = dcmtk.storescu(series, agent.port)
        assert len(dcmtk.acknowledged(result)) == len(series)

        # The page fetches itself every few seconds and swaps its content in place.
        wait_until(
            lambda: shown_counts(browser)["studies"]["sent"] == 1,
            90,
            interval=0.5,
            what="the page showing the study sent",
        )
        assert browser.execute_script("return window.notReloaded === true;")
        wait_until(
            lambda: shown_counts(browser) == status_counts(status()),
            30,
            interval=0.5,
            what="the page's counts equal to /status",
        )
        shown = shown_counts(browser)
        assert shown["instances"]["sent"] == len(series)
        assert shown["studies"]["sent"] == 1

        hour = browser.find_element(By.CSS_SELECTOR, "svg[data-received]")
        assert hour.get_attribute("data-received") == str(len(series))
        assert hour.get_attribute("data-sent") == str(len(series))
        assert len(hour.find_elements(By.CSS_SELECTOR, "rect.in")) == 60
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-study="{study_uid}"]')
        assert "sent" in row.text and str(len(series)) in row.text
        lights = {
            light.get_attribute("data-light"): light.get_attribute("data-level")
            for light in browser.find_elements(By.CSS_SELECTOR, "[data-light]")
        }
        assert lights == {"agent": "ok", "receiving": "ok", "cloud": "ok", "uploads": "ok"}
        state = browser.find_element(By.CSS_SELECTOR, "[data-state]")
        assert state.get_attribute("data-state") == status()["state"] == "healthy"
        last_upload = browser.find_element(By.CSS_SELECTOR, "[data-upload]")
        assert last_upload.get_attribute("data-upload") == status()["last_upload_at"]
        assert str(first.PatientName) not in browser.page_source
        assert str(first.PatientID) not in browser.page_source

        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []

        # The whole page, not only what the window shows.
        height = browser.execute_script("return document.documentElement.scrollHeight;")
        browser.set_window_size(1280, int(height) + 140)
        screenshot = tmp_path / "status-page.png"
        assert browser.save_screenshot(str(screenshot))
        print(f"status page screenshot: {screenshot}")
        if copy_to := os.environ.get("DIRIGO_PAGE_SCREENSHOT"):
            shutil.copyfile(screenshot, copy_to)

        # The agent stops: the page says so and keeps what it showed; it follows again
        # once the agent is back, still without a reload.
        agent.stop()
        header = browser.find_element(By.TAG_NAME, "header")
        wait_until(
            lambda: "stale" in (header.get_attribute("class") or ""),
            60,
            interval=0.5,
            what="the page marked stale",
        )
        assert "cannot reach the agent" in header.text
        assert shown_counts(browser)["instances"]["sent"] == len(series)
        agent.start()
        wait_until(
            lambda: "stale" not in (header.get_attribute("class") or ""),
            60,
            interval=0.5,
            what="the page following the restarted agent",
        )
        assert shown_counts(browser) == status_counts(status())
        assert browser.execute_script("return window.notReloaded === true;")
