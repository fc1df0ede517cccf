"""Hostile reports through the REAL api-server: a DB host that planted script in a report cannot run it in
Airflow's origin. Every report value reaches the HTML escaped, and every page carries a Content-Security-Policy
that allows only the page's own fixed script and style (Chromium, headless, proves the policy and that the
planted markup never became an element).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from pgops.airflow import hooks
from pgops.core import reports
from pgops.inventory import REPO_ROOT, load_inventory
from pgops.lab.airflow_stack import AirflowStack

pytestmark = [pytest.mark.lab, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Each payload, if it ever became markup, would add an element with id "pwned" or run script that does.
SCRIPT = "<script>document.body.appendChild(document.createElement('i')).id='pwned'</script>"
IMG = "<img id=pwned src=x onerror=\"document.title='pwned'\">"
ATTR = "x' onmouseover='document.title=1' data-x='"
RUN_ID = f"manual__{ATTR}"


def get(url: str, token: str | None) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - the test's own api-server
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def _inventory(tmp: Path) -> Path:
    base = yaml.safe_load((REPO_ROOT / "include" / "clusters.example.yaml").read_text())["clusters"][0]
    c = json.loads(json.dumps(base))
    c["name"] = "evil"
    c["storage"].update(prefix="hostile-ui", server_name="evil")
    c["runner"]["queue"] = "dbhost_evil"
    path = tmp / "clusters.yaml"
    path.write_text(yaml.safe_dump({"clusters": [c]}))
    return path


def _plant(inventory_path: Path, now: datetime) -> None:
    """What a compromised DB host could write: every string field a payload, numbers replaced by markup."""
    cluster = load_inventory(inventory_path).get("evil")
    s3 = hooks.s3_client(cluster.aws_conn_id)
    rounds = [{"index": i + 1, "started_at": (now - timedelta(hours=3 - i)).isoformat(), "duration_s": d,
               "delta_bytes": 2**20, "predicted_duration_s": None, "snapshots": {SCRIPT: IMG}, "copies": {}}
              for i, d in enumerate((600.0, 120.0))]
    rounds.append({"index": SCRIPT, "started_at": IMG, "duration_s": SCRIPT, "delta_bytes": IMG,
                   "predicted_duration_s": ATTR})
    decisions = [{"action": SCRIPT, "reason": IMG, "numbers": {"floor_s": SCRIPT, "r": IMG}}] * 3
    body = {"migration_id": SCRIPT, "rounds": rounds, "decisions": decisions, "outcome": IMG, "downtime_s": SCRIPT,
            "cutover_to_volume_available_s": ATTR, "plan": {"floor_s": IMG}, "dry_run": SCRIPT,
            "initialization": {IMG: SCRIPT, "vol-0123": ATTR}, "destination_volumes": {SCRIPT: IMG}}
    reports.write_report(s3, cluster, reports.envelope(
        kind="ebs-migration", cluster=cluster.name, run_id=RUN_ID, started_at=now - timedelta(hours=4),
        finished_at=now - timedelta(hours=1), status="ok", body=body))
    audit = {"backups": [{"backup_id": SCRIPT, "status": IMG, "end_time": (now - timedelta(hours=5)).isoformat(),
                          "begin_segment": "000000010000000000000002", "end_segment": "000000010000000000000003",
                          "timeline": 1, "size_bytes": SCRIPT}],
             "recoverable_window": {"earliest_backup_id": SCRIPT, "earliest_time": IMG, "latest_segment": ATTR},
             "continuity": {"gaps": [{"timeline": SCRIPT, "first_segment": IMG, "last_segment": ATTR, "count": SCRIPT}]},
             "findings": [{"id": SCRIPT, "severity": "critical", "message": IMG, "fix": ATTR, "evidence": {}}],
             "counts": {"critical": SCRIPT, "warning": IMG}}
    reports.write_report(s3, cluster, reports.envelope(
        kind="wal-audit", cluster=cluster.name, run_id=SCRIPT, started_at=now - timedelta(minutes=3),
        finished_at=now - timedelta(minutes=2), status="critical", body=audit))


@pytest.fixture(scope="module")
def stack(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-ui")
    inventory_path = _inventory(tmp)
    _plant(inventory_path, datetime.now(UTC))
    home = tmp / "airflow"
    home.mkdir()
    st = AirflowStack(home, extra_env={**lab.env(), "PGOPS_INVENTORY": str(inventory_path), "PGOPS_UI_CACHE_TTL_S": "1"})
    st.up()
    try:
        yield st
    finally:
        st.down()


PAGES = ("/pgops/", "/pgops/clusters/evil", f"/pgops/migration?cluster=evil&run_id={urllib.request.quote(RUN_ID)}",
         "/pgops/migration?dag_id=pgops_ebs_migration__evil", "/pgops/widget")


def test_planted_report_values_reach_every_page_escaped(stack):
    url, token = stack.load()["url"], stack.token()
    for path in PAGES:
        status, headers, html = get(url + path, token)
        assert status == 200, (path, status, html[-500:])
        for raw in ("<script>document", "<img", "onmouseover='", "' onmouseover"):
            assert raw not in html, (path, raw)
        assert html.count("<script>") == 1, path  # the page's own theme script, nothing else
    status, _, html = get(url + PAGES[2], token)
    # the migration report's initialization keys and values, the run id and the rounds: there, as text
    assert "&lt;img id=pwned src=x onerror=&quot;document.title=&#x27;pwned&#x27;&quot;&gt;: &lt;script&gt;" in html
    assert "x&#x27; onmouseover=&#x27;document.title=1&#x27; data-x=&#x27;" in html
    assert html.count("class='round-row'") == 3


def test_every_plugin_page_carries_the_content_security_policy(stack):
    url, token = stack.load()["url"], stack.token()
    for path, auth in [(p, token) for p in PAGES] + [("/pgops/", None), ("/pgops/api/fleet", token)]:
        status, headers, _ = get(url + path, auth)
        csp = {k.lower(): v for k, v in headers.items()}.get("content-security-policy", "")
        assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "frame-ancestors 'self'" in csp, \
            (path, status, csp)
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
        assert {k.lower(): v for k, v in headers.items()}.get("x-content-type-options") == "nosniff", path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("Debian's chromium and chromium-driver are not installed (include/test-apt-packages.txt)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_browser_runs_nothing_planted_and_the_policy_allows_the_page(stack, browser):
    from selenium.webdriver.common.by import By

    url = stack.load()["url"]
    browser.get(f"{url}/pgops/")  # the login cookie: Airflow's own token endpoint, then the UI's cookie name
    browser.add_cookie({"name": "_token", "value": stack.token(), "path": "/"})
    for path in PAGES:
        browser.get(url + path)
        deadline = time.monotonic() + 10
        while browser.execute_script("return document.readyState") != "complete" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert browser.find_elements(By.CSS_SELECTOR, "h1, ul.widget, p"), (path, browser.page_source[:500])
        assert not browser.find_elements(By.ID, "pwned"), path
        assert browser.title != "pwned" and browser.title != "1", path
        # the page's own style applied (allowed by its hash): body padding from _PAGE_CSS
        assert browser.execute_script("return getComputedStyle(document.body).paddingTop") in ("16px", "4px"), path
        violations = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not violations, (path, violations)
