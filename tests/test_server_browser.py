"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): sign in, watch a running job's
counters move, open its dead letters, cancel it; the operator changes a lane's limit. Screenshots go to
tests/artifacts/."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_rows
from test_server import Live, live_server

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing on CI; .ci/run must install Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); the dashboard test needs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def slow_job(prefix: str) -> dict[str, object]:
    """About 10 rows/s on the built-in simulator for minutes; every 7th row is a dead letter (division by zero)."""
    return {
        "spec": {
            "input": {"path": "rows.parquet", "id_column": "id"},
            "task": {"model": "gpt-4o-mini", "prompt": prefix + " {{ id }}: {{ text }} {{ 100 // n }}", "params": {"max_tokens": 20}},
            "limits": {"rpm": 600},
            "chunk_size": 10,
        }
    }


def sign_in(page, live: Live, who: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(live.url + "/")
    page.fill("#token", live.tokens[who])
    page.click("#signin")
    page.wait_for_selector(f"#whoami:has-text('{who}')")


def test_dashboard_user_and_operator(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    table = make_rows(3000)
    pq.write_table(table.append_column("n", pa.array([(i + 1) % 7 for i in range(3000)])), inputs / "rows.parquet")
    with live_server(tmp_path / "data", allow_dirs=[inputs]) as live:
        alice_api, op_api = live.client("alice"), live.client("op")
        job_id = alice_api.post("/jobs", json=slow_job("alice")).json()["id"]
        bob_job = live.client("bob").post("/jobs", json=slow_job("bob")).json()["id"]

        context = browser.new_context(viewport={"width": 1366, "height": 900})
        page = context.new_page()
        page.on("dialog", lambda dialog: dialog.accept())
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # a wrong token is refused with a sentence
        page.goto(live.url + "/")
        page.fill("#token", "bf_wrong")
        page.click("#signin")
        page.wait_for_selector("#signin-error:has-text('not accepted')")

        sign_in(page, live, "alice")
        page.wait_for_selector(f"tr[data-job='{job_id}']")
        assert page.locator(f"tr[data-job='{bob_job}']").count() == 0  # only her own jobs
        page.screenshot(path=str(ARTIFACTS / "1-my-jobs.png"))
        page.click(f"tr[data-job='{job_id}']")  # a locator: the list is redrawn every 2 s
        page.wait_for_selector("[data-testid=job-status]:has-text('running')")
        page.wait_for_function("() => Number(document.getElementById('rows-ok').textContent.replace(/,/g, '')) > 0")
        before = int(page.text_content("#rows-ok").replace(",", ""))
        page.wait_for_function(
            "n => Number(document.getElementById('rows-ok').textContent.replace(/,/g, '')) > n + 10", arg=before, timeout=30000
        )
        page.wait_for_function("() => document.getElementById('requests').textContent !== '0'")
        assert page.text_content("#cost").startswith("$")
        page.wait_for_timeout(2500)  # let the charts gather a few points for the screenshot
        page.screenshot(path=str(ARTIFACTS / "2-job-running.png"), full_page=True)

        page.click("[data-testid=btn-deadletters]")
        page.wait_for_selector("#deadletters-body tr")
        reasons = page.locator("#deadletters-body td:nth-child(3)").all_text_contents()
        assert reasons and all("ZeroDivisionError" in r for r in reasons)
        ids = page.locator("#deadletters-body td:nth-child(1)").all_text_contents()
        assert all(int(i.removeprefix("id-")) % 7 == 6 for i in ids)
        page.locator("#deadletters").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "3-dead-letters.png"), full_page=True)

        page.click("[data-testid=btn-cancel]")
        page.wait_for_selector("[data-testid=job-status]:has-text('cancelled')", timeout=15000)
        assert alice_api.get(f"/jobs/{job_id}").json()["reason"] == "cancelled by alice"
        assert page.is_disabled("[data-testid=btn-cancel]")
        page.screenshot(path=str(ARTIFACTS / "4-cancelled.png"))

        # the operator: every job by user, lanes, and a lane's limit changed live
        op_page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
        op_page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in(op_page, live, "op")
        op_page.click("[data-testid=nav-operator]")
        lane = next(lane for lane in op_api.get("/lanes").json() if bob_job in lane["jobs"])
        op_page.wait_for_selector(f"[data-testid=lane-rpm-{lane['key']}]")
        op_page.wait_for_selector(f"#all-jobs-body a:has-text('{bob_job}')")
        op_page.wait_for_selector(f"#all-jobs-body a:has-text('{job_id}')")
        op_page.wait_for_timeout(2500)  # a few lane points for the chart
        op_page.fill(f"[data-testid=lane-rpm-{lane['key']}]", "900")
        op_page.click(f"[data-testid=lane-apply-{lane['key']}]")
        op_page.wait_for_selector(f"[data-key='{lane['key']}'] dd:has-text('900 (set by operator)')")
        changed = next(x for x in op_api.get("/lanes").json() if x["key"] == lane["key"])
        assert changed["rpm"] == 900 and changed["override_rpm"] == 900
        op_page.screenshot(path=str(ARTIFACTS / "5-operator.png"), full_page=True)
        assert re.search(r"\$\d", op_page.text_content("#op-spend") or "")
        op_api.post(f"/jobs/{bob_job}/cancel")
        assert not errors, errors
