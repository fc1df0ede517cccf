"""The recoverability dashboard through the REAL api-server: JSON endpoints, HTML pages, login and DAG
permissions, and a headless Chromium (Debian's) that logs in and reads the pages.

Fixture reports are written to the lab bucket with `reports.write_report`, under two clusters of their own
(alpha: a WAL gap, a failed restore; beta: healthy, with a converging EBS migration), so other tests'
reports under the example cluster do not matter.
"""

from __future__ import annotations

import html
import json
import os
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

ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
NOBODY = "nobody"  # a SimpleAuthManager user without a role: the auth manager lets it read no DAG
MIB16 = 16 * 2**20


def seg(tli: int, segno: int) -> str:
    return f"{tli:08X}{segno // 256:08X}{segno % 256:08X}"


class DashboardStack(AirflowStack):
    """The real stack with a second, role-less user (the stack's env fixes the user list)."""

    def env(self, port: int) -> dict[str, str]:
        env = super().env(port)
        env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] += f",{NOBODY}:"
        return env

    def token_for(self, user: str) -> str:
        pw = json.loads((self.home / "passwords.json").read_text())[user]
        st = self.load()
        req = urllib.request.Request(f"{st['url']}/auth/token", data=json.dumps({"username": user, "password": pw}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return json.load(resp)["access_token"]


def get(stack: AirflowStack, path: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{stack.load()['url']}{path}", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _inventory(tmp: Path, overrides: dict[str, dict] | None = None) -> Path:
    """Clusters alpha and beta: the example's cluster with their own prefix and queue. ``overrides``: top-level keys
    that replace a cluster's, by cluster name (test_roles gives beta a replication section)."""
    data = yaml.safe_load((REPO_ROOT / "include" / "clusters.example.yaml").read_text())
    base = data["clusters"][0]
    clusters = []
    for name in ("alpha", "beta"):
        c = json.loads(json.dumps(base))
        c["name"] = name
        c["storage"].update(prefix="ui-tests", server_name=name)
        c["runner"]["queue"] = f"dbhost_{name}"
        c.update(json.loads(json.dumps((overrides or {}).get(name, {}))))
        clusters.append(c)
    path = tmp / "clusters.yaml"
    path.write_text(yaml.safe_dump({"clusters": clusters}))
    return path


def _backup(bid: str, end: datetime, begin: int, size: int = 2**30) -> dict:
    return {"backup_id": bid, "status": "DONE", "timeline": 1, "begin_segment": seg(1, begin),
            "end_segment": seg(1, begin + 1), "begin_lsn": None, "end_lsn": None,
            "begin_time": (end - timedelta(minutes=10)).isoformat(), "end_time": end.isoformat(), "size_bytes": size}


def _write_fixtures(inventory_path: Path, now: datetime) -> None:
    """The clusters' reports, on an empty prefix (another module of the session, test_roles, writes them too)."""
    inv = load_inventory(inventory_path)
    s3 = hooks.s3_client(inv.clusters[0].aws_conn_id)
    for cluster in inv.clusters:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=cluster.storage.bucket,
                                                                  Prefix=f"{cluster.storage.server_prefix}/"):
            for obj in page.get("Contents", []):
                s3.delete_object(Bucket=cluster.storage.bucket, Key=obj["Key"])
    for cluster in inv.clusters:
        gap = cluster.name == "alpha"
        backups = [_backup("b1", now - timedelta(days=3), 10), _backup("b2", now - timedelta(days=2), 40),
                   _backup("b3", now - timedelta(hours=12), 80)]
        gaps = [{"timeline": 1, "first_segment": seg(1, 50), "last_segment": seg(1, 59), "count": 10,
                 "backup_ids": ["b1", "b2"], "inconsistent_backup_ids": []}] if gap else []
        findings = [{"id": "WAL_GAP", "severity": "critical", "message": "WAL archive gap on timeline 1: 10 segment(s)",
                     "evidence": {}, "fix": "take a new base backup"}] if gap else []
        window = {"earliest_backup_id": "b3" if gap else "b1", "earliest_time": backups[2 if gap else 0]["end_time"],
                  "latest_segment": seg(1, 100), "latest_lsn": "0/64000000",
                  "latest_time": (now - timedelta(minutes=1)).isoformat()}
        body = {"bucket": cluster.storage.bucket, "prefix": cluster.storage.server_prefix, "wal_segment_size_bytes": MIB16,
                "backups": backups, "recoverable_window": window,
                "continuity": {"newest_segment": seg(1, 100), "gaps": gaps, "window": window,
                               "broken_backup_ids": ["b1", "b2"] if gap else []},
                "freshness": {"newest_backup_time": backups[2]["end_time"],
                              "newest_wal_time": (now - timedelta(minutes=1)).isoformat()},
                "lifecycle": {"days_until_last_backup_expires": None}, "findings": findings,
                "counts": {"critical": len(findings), "warning": 0, "ok": 0}}
        reports.write_report(s3, cluster, reports.envelope(
            kind="wal-audit", cluster=cluster.name, run_id="audit_fixture", started_at=now - timedelta(minutes=3),
            finished_at=now - timedelta(minutes=2), status="critical" if gap else "ok", body=body))
        # beta grows slowly (1.5 GiB in two months): its RTO forecast stays under the target; alpha's restores are
        # all in the last week (the timeline shows them)
        history = (((4, 1.0, 100.0), (3, 1.5, 150.0), (2, 2.0, 210.0), (1, 2.5, 240.0)) if gap else
                   ((60, 1.0, 100.0), (40, 1.5, 150.0), (20, 2.0, 210.0), (1, 2.5, 240.0)))
        for i, (days_ago, gib, rto) in enumerate(history):
            failed = gap and i == 3
            t = now - timedelta(days=days_ago)
            rbody = {"backup_id": "b2", "measurements": {"database_size_bytes": int(gib * 2**30),
                                                          "rto_s": None if failed else rto},
                     "canary": {"archive_lag_s": 2.5}, "rto_target_s": cluster.targets.rto_s,
                     "errors": {"restore": "barman-cloud-restore exited 1"} if failed else {},
                     "steps_not_finished": [], "rto_trend": {"points": i + 1}}
            reports.write_report(s3, cluster, reports.envelope(
                kind="restore-verify", cluster=cluster.name, run_id=f"rv_{i}", started_at=t - timedelta(minutes=5),
                finished_at=t, status="failed" if failed else "ok", body=rbody))
        if not gap:
            rounds = [{"index": i + 1, "started_at": (now - timedelta(hours=6 - i)).isoformat(), "duration_s": d,
                       "delta_bytes": int(d * 40 * 2**20), "predicted_duration_s": None if i == 0 else d * 1.1,
                       "snapshots": {}, "copies": {}} for i, d in enumerate((1800.0, 400.0, 110.0, 50.0))]
            decisions = [{"action": "another_round", "reason": "no round has finished", "numbers": {}}]
            decisions += [{"action": "cut_over" if i == 3 else "another_round", "reason": f"after round {i + 1}",
                           "numbers": {"floor_s": 35.0, "r": 0.22, "downtime_target_s": 120.0}} for i in range(4)]
            mbody = {"migration_id": "mig-beta", "rounds": rounds, "decisions": decisions, "outcome": "cut_over",
                     "downtime_s": 75.0, "cutover_to_volume_available_s": 95.0, "plan": {"floor_s": 33.0},
                     "initialization": {"vol-0123": "completed"}, "destination_volumes": {"vol-a": "vol-0123"}}
            reports.write_report(s3, cluster, reports.envelope(
                kind="ebs-migration", cluster=cluster.name, run_id="manual__mig_beta", started_at=now - timedelta(hours=7),
                finished_at=now - timedelta(hours=1), status="ok", body=mbody))


@pytest.fixture(scope="module")
def dash(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    inventory_path = _inventory(tmp)
    _write_fixtures(inventory_path, datetime.now(UTC))
    home = tmp / "airflow"
    home.mkdir()
    (home / "passwords.json").write_text(json.dumps({"admin": "admin-ui-test", NOBODY: "nobody-ui-test"}))
    os.chmod(home / "passwords.json", 0o600)
    stack = DashboardStack(home, extra_env={**lab.env(), "PGOPS_INVENTORY": str(inventory_path),
                                            "PGOPS_UI_CACHE_TTL_S": "2"})
    stack.up()
    try:
        yield stack, inventory_path
    finally:
        stack.down()


def test_plugin_is_registered(dash):
    stack, _ = dash
    plugins = stack._request("GET", "/api/v2/plugins")["plugins"]
    ours = next(p for p in plugins if p["name"] == "pgops_dashboard")
    assert [a["url_prefix"] for a in ours["fastapi_apps"]] == ["/pgops"]
    assert {(v["name"], v["destination"]) for v in ours["external_views"]} >= {("Recoverability", "nav"),
                                                                               ("EBS migration rounds", "dag_run")}
    assert [r["destination"] for r in ours["react_apps"]] == ["dashboard"]
    errors = stack._request("GET", "/api/v2/plugins/importErrors")
    assert not [e for e in errors.get("import_errors", []) if "pgops" in json.dumps(e)], errors


def test_without_a_login_every_route_is_refused(dash):
    stack, _ = dash
    for path in ("/pgops/api/fleet", "/pgops/api/clusters/alpha/timeline", "/pgops/api/clusters/alpha/rto",
                 "/pgops/api/clusters/beta/migration", "/pgops/", "/pgops/clusters/alpha", "/pgops/widget"):
        status, body = get(stack, path, None)
        assert status == 401, (path, status, body[:200])
        status, _ = get(stack, path, "not-a-jwt")
        assert status == 403, path
    status, body = get(stack, "/pgops/", None)
    assert b"/auth/login?next=" in body


def test_fleet_rows_colours_and_reasons(dash):
    stack, _ = dash
    status, body = get(stack, "/pgops/api/fleet", stack.token())
    assert status == 200
    rows = {r["cluster"]: r for r in json.loads(body)["clusters"]}
    assert set(rows) == {"alpha", "beta"}
    alpha, beta = rows["alpha"], rows["beta"]
    assert alpha["colour"] == "red" and alpha["reason"].startswith("WAL_GAP")
    assert any("restore verification failed" in r["text"] for r in alpha["reasons"])
    assert alpha["findings"] == {"critical": 1, "warning": 0} and alpha["restore"]["passed"] is False
    assert beta["colour"] == "green", beta["reasons"]
    assert beta["window"]["earliest_backup_id"] == "b1" and beta["newest_backup"]["backup_id"] == "b3"
    assert beta["restore"]["rto_s"] == 240.0 and beta["restore"]["rpo_s"] == 2.5
    assert beta["migration"]["outcome"] == "cut_over" and beta["migration"]["colour"] == "green"
    assert set(beta["dag_ids"].values()) >= {"pgops_base_backup__beta", "pgops_ebs_migration__beta"}


def test_cluster_timeline_rto_and_migration_json(dash):
    stack, _ = dash
    token = stack.token()
    status, body = get(stack, "/pgops/api/clusters/alpha/timeline?days=7", token)
    tl = json.loads(body)
    assert status == 200 and len(tl["backups"]) == 3 and len(tl["gaps"]) == 1
    assert tl["gaps"][0]["first_segment"] == seg(1, 50) and tl["unreachable"]
    assert [r["passed"] for r in tl["restores"]] == [True, True, True, False]
    status, body = get(stack, "/pgops/api/clusters/beta/rto", token)
    rto = json.loads(body)
    assert status == 200 and len(rto["points"]) == 4 and rto["fit"] and rto["target_s"] == 3600
    assert abs(rto["trend"]["seconds_per_gib"] - 96.0) < 1e-6
    # the fleet table and the cluster page show the same forecast, fitted on the 4 restores of 4 sizes
    status, body = get(stack, "/pgops/api/fleet", token)
    beta = {r["cluster"]: r for r in json.loads(body)["clusters"]}["beta"]
    assert rto["forecast"]["status"] == "ok" and beta["rto_forecast"]["text"] == rto["forecast"]["text"]
    assert rto["forecast"]["projected_rto_s"] < 3600 and not beta["rto_forecast"]["over_target"]
    status, body = get(stack, "/pgops/clusters/beta", token)
    assert status == 200 and html.escape(rto["forecast"]["text"], quote=True) in body.decode()
    status, body = get(stack, "/pgops/api/clusters/beta/migration?run_id=manual__mig_beta", token)
    mig = json.loads(body)
    assert status == 200 and mig["colour"] == "green" and len(mig["rounds"]) == 4
    assert mig["floor_s"] == 35.0 and mig["downtime_s"] == 75.0 and mig["rounds"][-1]["decision"] == "cut_over"
    status, body = get(stack, "/pgops/api/clusters/beta/migrations", token)
    assert [r["run_id"] for r in json.loads(body)["runs"]] == ["manual__mig_beta"]
    assert get(stack, "/pgops/api/clusters/alpha/migration", token)[0] == 404
    assert get(stack, "/pgops/api/clusters/nosuch/timeline", token)[0] == 404


def test_html_pages_render_the_charts(dash):
    stack, _ = dash
    token = stack.token()
    status, body = get(stack, "/pgops/", token)
    html = body.decode()
    assert status == 200 and html.count("class='cluster-row'") == 2 and "data-colour='red'" in html
    status, body = get(stack, "/pgops/clusters/alpha", token)
    html = body.decode()
    assert status == 200 and html.count("data-backup-id=") == 3 and html.count("data-first-segment=") == 1
    status, body = get(stack, "/pgops/migration?dag_id=pgops_ebs_migration__beta&run_id=manual__mig_beta", token)
    assert status == 200 and body.decode().count("data-round=") == 4
    status, body = get(stack, "/pgops/migration?dag_id=pgops_base_backup__beta&run_id=x", token)
    assert status == 200 and b"not an EBS migration" in body


def test_a_user_without_dag_access_sees_no_cluster(dash):
    stack, _ = dash
    token = stack.token_for(NOBODY)
    status, body = get(stack, "/pgops/api/fleet", token)
    assert status == 200 and json.loads(body)["clusters"] == []
    assert get(stack, "/pgops/api/clusters/alpha/timeline", token)[0] == 403
    assert get(stack, "/pgops/api/clusters/beta/migration", token)[0] == 403
    status, body = get(stack, "/pgops/", token)
    assert status == 200 and b"no-clusters" in body


def test_reports_are_cached_for_the_ttl_then_reread(dash):
    stack, inventory_path = dash
    token = stack.token()
    beta = load_inventory(inventory_path).get("beta")
    s3 = hooks.s3_client(beta.aws_conn_id)
    before = json.loads(get(stack, "/pgops/api/fleet", token)[1])
    latest = reports.read_latest(s3, beta, "restore-verify")
    latest["finished_at"] = datetime.now(UTC).isoformat()
    latest["run_id"] = "rv_cache_probe"
    reports.write_report(s3, beta, latest)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = {r["cluster"]: r for r in json.loads(get(stack, "/pgops/api/fleet", token)[1])["clusters"]}
        if rows["beta"]["restore"]["finished_at"] == latest["finished_at"]:
            break
        time.sleep(1)
    else:
        pytest.fail("the fleet never showed the new restore report")
    assert before["clusters"]


def test_a_running_run_shows_its_progress(dash):
    """The backup task's progress record (pgops.airflow.progress) is shown for the run that wrote it while it runs."""
    import sqlite3

    from pgops.airflow import progress

    stack, inventory_path = dash
    beta = load_inventory(inventory_path).get("beta")
    dag_id = "pgops_base_backup__beta"
    stack.wait_for_dag(dag_id)
    # a run of the paused DAG (the scheduler leaves it alone), marked running as a worker would
    run_id = stack._request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None})["dag_run_id"]
    with sqlite3.connect(stack.home / "airflow.db") as db:
        db.execute("UPDATE dag_run SET state = 'running' WHERE dag_id = ? AND run_id = ?", (dag_id, run_id))
    publish = progress.bucket_publisher(hooks.s3_client(beta.aws_conn_id), beta, "backup")
    record = {"kind": "backup", "what": "base backup of beta", "run_id": "another-run", "state": "running",
              "done_bytes": 3 * 2**30, "total_bytes": 12 * 2**30, "verb": "uploaded", "elapsed_s": 120}
    publish(record)
    status, body = get(stack, "/pgops/clusters/beta", stack.token())
    assert status == 200 and "class='progress'" not in body.decode()  # another run's record is not this run's
    publish({**record, "run_id": run_id})
    status, body = get(stack, "/pgops/clusters/beta", stack.token())
    page = body.decode()
    assert status == 200 and "<div class='progress'>base backup of beta: 3.0 GiB uploaded of ~12.0 GiB (25%)" in page
    publish({**record, "run_id": run_id, "state": "done"})
    assert "class='progress'" not in get(stack, "/pgops/clusters/beta", stack.token())[1].decode()


# --- the browser ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("Debian's chromium and chromium-driver are not installed (include/test-apt-packages.txt)")
    from selenium import webdriver  # requirements: selenium (drives Debian's chromium through chromedriver)
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, css: str, timeout_s: float = 30, count: int = 1):
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if len(found) >= count:
            return found
        time.sleep(0.3)
    driver.save_screenshot(str(ARTIFACTS / "ui-timeout.png"))
    raise AssertionError(f"{css!r} did not appear on {driver.current_url} within {timeout_s} s")


def test_browser_logs_in_and_reads_the_dashboard(dash, browser):
    from selenium.webdriver.common.by import By

    stack, _ = dash
    url = stack.load()["url"]
    browser.get(f"{url}/pgops/")  # not logged in: the page links to Airflow's login
    _wait(browser, "a#login")[0].click()
    _wait(browser, "input[name=username]")[0].send_keys("admin")
    browser.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys("admin-ui-test")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    deadline = time.monotonic() + 30
    while not browser.get_cookie("_token") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert browser.get_cookie("_token"), "logging in did not set Airflow's session cookie"

    browser.get(f"{url}/pgops/")
    rows = _wait(browser, "tr.cluster-row", count=2)
    assert {r.get_attribute("data-cluster"): r.get_attribute("data-colour") for r in rows} == {"alpha": "red", "beta": "green"}
    browser.save_screenshot(str(ARTIFACTS / "ui-fleet.png"))

    browser.find_element(By.CSS_SELECTOR, "tr[data-cluster=alpha] a.cluster-link").click()
    _wait(browser, "svg.pg-timeline")
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.pg-timeline circle[data-backup-id]")) == 3
    gaps = browser.find_elements(By.CSS_SELECTOR, "svg.pg-timeline rect.gap[data-first-segment]")
    assert [g.get_attribute("data-first-segment") for g in gaps] == [seg(1, 50)]
    assert gaps[0].rect["width"] >= 3  # drawn, not a zero-width mark
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.pg-rto circle[data-at]")) == 3  # the failed run has no RTO
    assert browser.find_element(By.CSS_SELECTOR, "#cluster-state").get_attribute("data-colour") == "red"
    browser.save_screenshot(str(ARTIFACTS / "ui-cluster-alpha.png"))

    browser.get(f"{url}/pgops/migration?dag_id=pgops_ebs_migration__beta&run_id=manual__mig_beta")
    bars = _wait(browser, "svg.pg-rounds rect[data-round]", count=4)
    heights = [float(b.get_attribute("height")) for b in bars]
    assert heights == sorted(heights, reverse=True)  # a converging chain: every round shorter
    assert len(browser.find_elements(By.CSS_SELECTOR, "#rounds-table tr.round-row")) == 4
    browser.save_screenshot(str(ARTIFACTS / "ui-migration-beta.png"))


def test_browser_sees_the_nav_entry_and_the_home_widget(dash, browser):
    from selenium.webdriver.common.by import By

    stack, _ = dash
    url = stack.load()["url"]
    if not browser.get_cookie("_token"):
        pytest.skip("needs the login of the previous test")
    browser.get(f"{url}/")
    frame = _wait(browser, "iframe[title='pgops recoverability']", timeout_s=60)[0]
    browser.save_screenshot(str(ARTIFACTS / "ui-home-widget.png"))
    browser.switch_to.frame(frame)
    try:
        items = _wait(browser, "li.widget-row", count=2)
        assert sorted(i.get_attribute("data-colour") for i in items) == ["green", "red"]
    finally:
        browser.switch_to.default_content()
    browser.get(f"{url}/plugin/recoverability")
    frame = _wait(browser, "iframe", timeout_s=60)[0]
    browser.switch_to.frame(frame)
    try:
        assert len(_wait(browser, "tr.cluster-row", count=2)) == 2
    finally:
        browser.switch_to.default_content()
    browser.save_screenshot(str(ARTIFACTS / "ui-nav-recoverability.png"))
    assert browser.find_elements(By.XPATH, "//*[contains(text(), 'Recoverability')]")
