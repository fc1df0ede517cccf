"""The dashboard's FastAPI app, mounted in Airflow's API server at /pgops by the plugin.

Every route needs an Airflow login (the API server's own `get_user`, behind `GetUserDep`: a bearer token or the UI's `_token`
cookie): without one the JSON routes answer 401 (403 for an invalid token), the HTML pages the same status
with a link to the login page. A user sees only the clusters whose pgops DAGs the auth manager lets them read.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pgops.airflow import progress
from pgops.airflow.ui import charts, summary
from pgops.airflow.ui.data import (
    MIGRATION_HISTORY,
    RESTORE_HISTORY,
    ReportSource,
    backup_events,
    dag_ids,
    latest_runs,
)
from pgops.inventory import Cluster

log = logging.getLogger(__name__)

URL_PREFIX = "/pgops"
WIDGET_JS = Path(__file__).with_name("widget.js")
DEFAULT_DAYS = 14


_bearer = HTTPBearer(auto_error=False)


async def current_user(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)):  # noqa: B008
    """The logged-in Airflow user (bearer token or the UI's `_token` cookie), 401/403 otherwise.

    The API server's own `get_user` (what `GetUserDep` resolves), imported on the first request: importing
    airflow.api_fastapi.core_api.security costs ~2.4 s, and every Airflow process loads this plugin.
    """
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request=request, _oauth_token=None, bearer_credentials=creds)


def _readable_dag_ids(user: Any, wanted: set[str]) -> set[str]:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().filter_authorized_dag_ids(dag_ids=wanted, user=user, method="GET")


def create_app(source: ReportSource | None = None) -> FastAPI:
    app = FastAPI(title="pgops recoverability", docs_url=None, redoc_url=None, openapi_url=None)
    ttl_s = float(os.environ.get("PGOPS_UI_CACHE_TTL_S", "60"))
    app.state.source = source or ReportSource(ttl_s=ttl_s)
    _add_security(app)
    clusters = _Clusters(app)
    _add_json_routes(app, clusters)
    _add_html_routes(app, clusters)
    return app


def _add_security(app: FastAPI) -> None:
    """Security headers on every response; a missing or refused login on a page links to Airflow's login."""

    @app.middleware("http")
    async def _security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith(f"{request.scope.get('root_path', '')}/api/") or exc.status_code not in (401, 403):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        nxt = quote(str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""), safe="")
        body = (f"<p>{escape(str(exc.detail))}. <a id='login' href='/auth/login?next={nxt}'>Log in to Airflow</a> "
                "to see the recoverability dashboard.</p>")
        return HTMLResponse(_page("Recoverability: log in", body, base=""), status_code=exc.status_code)


class _Clusters:
    """Who may see which cluster, and the views built over the app's report source."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app

    @property
    def source(self) -> ReportSource:
        return self._app.state.source

    # --- who may see what ---------------------------------------------------------------------------------
    def visible(self, user: Any) -> list[Cluster]:
        clusters = self.source.inventory().clusters
        wanted = {d for c in clusters for d in dag_ids(c).values()}
        readable = _readable_dag_ids(user, wanted)
        return [c for c in clusters if readable & set(dag_ids(c).values())]

    def one(self, user: Any, name: str) -> Cluster:
        for c in self.visible(user):
            if c.name == name:
                return c
        if any(c.name == name for c in self.source.inventory().clusters):
            raise HTTPException(403, f"you may not read the DAGs of cluster {name}")
        raise HTTPException(404, f"cluster {name} is not in the inventory")

    def migration_cluster(self, user: Any, name: str) -> Cluster:
        c = self.one(user, name)
        if not _readable_dag_ids(user, {dag_ids(c)["migration"]}):
            raise HTTPException(403, f"you may not read DAG {dag_ids(c)['migration']}")
        return c

    # --- builders over the sources --------------------------------------------------------------------------
    def row(self, c: Cluster, now: datetime) -> dict[str, Any]:
        try:
            return self._row(c, now)
        except Exception as exc:  # one cluster's malformed report must not hide the fleet
            log.warning("cluster %s: its reports cannot be summarised: %r", c.name, exc)
            return _unreadable_row(c.name, exc) | {"runs": {}, "dag_ids": dag_ids(c)}

    def _row(self, c: Cluster, now: datetime) -> dict[str, Any]:
        from pgops.airflow.audit import interval_s

        s = self.source
        events = _safe_db(lambda: backup_events(c.name, limit=1), [])
        r = summary.fleet_row(
            c.name, now=now, audit=s.latest(c, "wal-audit"), restore=s.latest(c, "restore-verify"),
            migration=s.latest(c, "ebs-migration"), backup_event=events[0] if events else None,
            restores=s.history(c, "restore-verify", RESTORE_HISTORY), rto_target_s=c.targets.rto_s, rpo_target_s=c.targets.rpo_s,
            backup_interval_s=interval_s(c.schedule.backup, now=now),
            audit_interval_s=interval_s(c.schedule.audit, now=now),
            restore_interval_s=interval_s(c.schedule.restore_verify, now=now))
        r["runs"] = _safe_db(lambda: latest_runs(dag_ids(c)), {})
        r["dag_ids"] = dag_ids(c)
        for kind, run in r["runs"].items():  # a running run shows how far it has come
            if run and run["state"] == "running":
                rec = s.progress(c, kind)
                if rec and rec.get("run_id") == run["run_id"] and rec.get("state") == "running":
                    run["progress"] = progress.describe(rec)
        return r

    def timeline(self, c: Cluster, now: datetime, days: int) -> dict[str, Any]:
        s = self.source
        return summary.timeline(s.latest(c, "wal-audit"), now=now, days=days,
                                restores=s.history(c, "restore-verify", RESTORE_HISTORY),
                                backup_events=_safe_db(lambda: backup_events(c.name), []))

    def rto(self, c: Cluster) -> dict[str, Any]:
        return summary.rto_series(self.source.history(c, "restore-verify", RESTORE_HISTORY), target_s=c.targets.rto_s)

    def migration(self, c: Cluster, run_id: str | None) -> dict[str, Any] | None:
        s = self.source
        latest = s.latest(c, "ebs-migration")
        if run_id is None or (latest and latest.get("run_id") == run_id):
            return latest
        for rep in reversed(s.history(c, "ebs-migration", MIGRATION_HISTORY)):
            if rep.get("run_id") == run_id:
                return rep
        return None

    def migrations(self, c: Cluster) -> list[dict[str, Any]]:
        reps = self.source.history(c, "ebs-migration", MIGRATION_HISTORY)
        return [{"run_id": r.get("run_id"), "status": r.get("status"), "finished_at": r.get("finished_at"),
                 "outcome": (r.get("body") or {}).get("outcome")} for r in reversed(reps)]


def _add_json_routes(app: FastAPI, clusters: _Clusters) -> None:
    @app.get("/api/fleet")
    def api_fleet(user=Depends(current_user)) -> dict[str, Any]:  # noqa: B008
        now = datetime.now(UTC)
        return {"generated_at": now.isoformat(), "clusters": [clusters.row(c, now) for c in clusters.visible(user)]}

    @app.get("/api/clusters/{name}/timeline")
    def api_timeline(name: str, days: int = Query(DEFAULT_DAYS, ge=1, le=90), user=Depends(current_user)):  # noqa: B008
        return clusters.timeline(clusters.one(user, name), datetime.now(UTC), days)

    @app.get("/api/clusters/{name}/rto")
    def api_rto(name: str, user=Depends(current_user)):  # noqa: B008
        return clusters.rto(clusters.one(user, name))

    @app.get("/api/clusters/{name}/migrations")
    def api_migrations(name: str, user=Depends(current_user)):  # noqa: B008
        return {"cluster": name, "runs": clusters.migrations(clusters.migration_cluster(user, name))}

    @app.get("/api/clusters/{name}/migration")
    def api_migration(name: str, run_id: str | None = None, user=Depends(current_user)):  # noqa: B008
        rep = clusters.migration(clusters.migration_cluster(user, name), run_id)
        if rep is None:
            raise HTTPException(404, f"no ebs-migration report for cluster {name}"
                                     + (f" and run {run_id}" if run_id else ""))
        return summary.migration_view(rep)


def _add_html_routes(app: FastAPI, clusters: _Clusters) -> None:
    @app.get("/", response_class=HTMLResponse)
    def fleet_page(request: Request, user=Depends(current_user)):  # noqa: B008
        base = request.scope.get("root_path", "")
        now = datetime.now(UTC)
        rows = [clusters.row(c, now) for c in clusters.visible(user)]
        return _page("Recoverability", _fleet_html(rows, base), base=base)

    @app.get("/clusters/{name}", response_class=HTMLResponse)
    def cluster_page(request: Request, name: str, days: int = Query(DEFAULT_DAYS, ge=1, le=90),
                     user=Depends(current_user)):  # noqa: B008
        base = request.scope.get("root_path", "")
        c = clusters.one(user, name)
        now = datetime.now(UTC)
        r = clusters.row(c, now)
        may_migrate = bool(_readable_dag_ids(user, {dag_ids(c)["migration"]}))
        try:
            body = _cluster_html(r, clusters.timeline(c, now, days), clusters.rto(c),
                                 clusters.migrations(c) if may_migrate else [], base, days)
        except Exception as exc:  # a malformed report: say so, escaped, instead of a 500
            log.warning("cluster %s: its reports cannot be drawn: %r", name, exc)
            body = _unreadable_html(name, exc, base)
        return _page(f"Recoverability of {name}", body, base=base)

    @app.get("/migration", response_class=HTMLResponse)
    def migration_page(request: Request, cluster: str | None = None, dag_id: str | None = None,
                       run_id: str | None = None, user=Depends(current_user)):  # noqa: B008
        base = request.scope.get("root_path", "")
        prefix = "pgops_ebs_migration__"
        if cluster is None and dag_id:
            if not dag_id.startswith(prefix):
                return _page("EBS migration", f"<p class='muted'>DAG {escape(dag_id)} is not an EBS migration; this view "
                                              f"shows the rounds of {prefix}* runs.</p>", base=base)
            cluster = dag_id[len(prefix):]
        if not cluster:
            raise HTTPException(400, "name a cluster (?cluster=) or a migration DAG (?dag_id=)")
        c = clusters.migration_cluster(user, cluster)
        rep = clusters.migration(c, run_id)
        if rep is None:
            return _page("EBS migration", f"<p class='muted'>No ebs-migration report for cluster {escape(cluster)}"
                                          f"{' and run ' + escape(run_id) if run_id else ''} yet (the report is written "
                                          "when the run ends).</p>", base=base)
        try:
            body = _migration_html(summary.migration_view(rep), base)
        except Exception as exc:  # a malformed report: say so, escaped, instead of a 500
            log.warning("cluster %s: its ebs-migration report cannot be drawn: %r", cluster, exc)
            body = _unreadable_html(cluster, exc, base)
        return _page(f"EBS migration of {cluster}", body, base=base)

    @app.get("/widget", response_class=HTMLResponse)
    def widget_page(request: Request, user=Depends(current_user)):  # noqa: B008
        base = request.scope.get("root_path", "")
        now = datetime.now(UTC)
        rows = [clusters.row(c, now) for c in clusters.visible(user)]
        return _page("Recoverability", _widget_html(rows, base), base=base, compact=True)

    @app.get("/static/widget.js")
    def widget_js() -> Response:
        # code only, no data: the dashboard widget frames /widget, which checks the login
        return Response(WIDGET_JS.read_text(), media_type="text/javascript",
                        headers={"Cache-Control": "no-cache"})


def _safe_db(fn, default):
    try:
        return fn()
    except Exception as exc:  # the metadata DB is extra detail: a failure must not hide the bucket's reports
        log.warning("reading Airflow's metadata DB failed: %s", exc)
        return default


# --- HTML rendering -------------------------------------------------------------------------------------------

_PAGE_CSS = """
body { margin: 0; padding: 16px 20px; background: var(--pg-bg); color: var(--pg-fg); font: 14px system-ui, sans-serif; }
body.compact { padding: 4px 8px; }
a { color: var(--pg-wal); }
h1 { font-size: 20px; margin: 0 0 12px; } h2 { font-size: 16px; margin: 20px 0 8px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--pg-grid); vertical-align: top; }
th { font-weight: 600; font-size: 12px; color: var(--pg-muted); }
tr:hover td { background: var(--pg-row); }
.muted { color: var(--pg-muted); } .small { font-size: 12px; }
.dot { display: inline-block; width: 11px; height: 11px; border-radius: 50%; margin-right: 6px; vertical-align: -1px; }
.dot.green { background: var(--pg-green); } .dot.amber { background: var(--pg-amber); } .dot.red { background: var(--pg-red); }
.badge { font-weight: 600; } .badge.green { color: var(--pg-green); } .badge.amber { color: var(--pg-amber); }
.badge.red { color: var(--pg-red); }
ul.reasons { margin: 4px 0; padding-left: 18px; } ul.widget { list-style: none; margin: 0; padding: 0; }
ul.widget li { padding: 3px 0; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
"""

# follow the Airflow UI's colour mode when framed by it (same origin), else the OS preference
_THEME_SCRIPT = """(function(){try{var p=window.parent&&window.parent.document.documentElement;
if(p&&p!==document.documentElement){var d=p.classList.contains('dark')||p.style.colorScheme==='dark';
document.documentElement.classList.add(d?'dark':'light');}}catch(e){}})();"""
_STYLE = charts.STYLE + _PAGE_CSS


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# The pages' only script and style are the two fixed blocks above, allowed by their hashes: a value from a report
# that slipped past escaping could neither run script nor load anything. Framed only by Airflow's own UI.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src {_sha256(_THEME_SCRIPT)}; style-src {_sha256(_STYLE)}; "
                           "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin"}


def _page(title: str, body: str, *, base: str, compact: bool = False) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><script>{_THEME_SCRIPT}</script>"
            f"<style>{_STYLE}</style></head><body class='{'compact' if compact else ''}'>"
            f"{'' if compact else f'<h1>{escape(title)}</h1>'}{body}</body></html>")


def _unreadable_reason(name: str, exc: Exception) -> str:
    return (f"the reports of cluster {name} in the bucket are malformed ({type(exc).__name__}: {str(exc)[:200]}). "
            "Fix: look at <prefix>/<server>/pgops/reports/*/latest.json; only pgops' tasks should write there")


def _unreadable_row(name: str, exc: Exception) -> dict[str, Any]:
    reason = _unreadable_reason(name, exc)
    return {"cluster": name, "colour": "red", "reason": reason, "reasons": [{"colour": "red", "text": reason}],
            "newest_backup": None, "window": None, "findings": {"critical": 0, "warning": 0}, "restore": None,
            "rto_forecast": None, "days_until_loss": None, "migration": None, "unreadable": True}


def _unreadable_html(name: str, exc: Exception, base: str) -> str:
    return (f"<p><a href='{base}/'>← fleet</a></p><p id='unreadable' class='badge red'>"
            f"{_e(_unreadable_reason(name, exc))}</p>")


def _e(v: Any) -> str:
    return escape("" if v is None else str(v), quote=True)


def _when(iso: str | None) -> str:
    t = summary.parse_ts(iso)
    return t.strftime("%Y-%m-%d %H:%M UTC") if t else "—"


def _ago(age_s: float | None) -> str:
    return "—" if age_s is None else f"{summary.human_duration(age_s)} ago"


def _colour(c: str, text: str | None = None) -> str:
    c = _e(c)
    return f"<span class='dot {c}' title='{c}'></span><span class='badge {c}'>{_e(text or c)}</span>"


def _fleet_html(rows: list[dict[str, Any]], base: str) -> str:
    if not rows:
        return "<p class='muted' id='no-clusters'>No cluster to show: the inventory is empty or you may not read any pgops DAG.</p>"
    head = ("<table id='fleet'><thead><tr><th>Cluster</th><th>State</th><th>Newest backup</th><th>Recoverable window</th>"
            "<th>Open findings</th><th>Primary and endpoint</th><th>Last restore test</th><th>RTO forecast</th>"
            "<th>Days until loss</th><th>Migration</th></tr></thead><tbody>")
    out = [head]
    for r in rows:
        nb, win, rs, fc, mig = r["newest_backup"], r["window"], r["restore"], r["rto_forecast"], r["migration"]
        backup = (f"{_ago(nb['age_s'])}<div class='small muted'>{_e(nb.get('backup_id'))} {_e(nb.get('status'))}</div>"
                  if nb else "none")
        window = (f"{_when(win['earliest_time'])} → {_when(win['latest_time'])}"
                  f"<div class='small muted'>from {_e(win.get('earliest_backup_id'))} to {_e(win.get('latest_segment'))}</div>"
                  if win else "<span class='badge red'>none</span>")
        findings = (f"<span class='badge red'>{_e(r['findings']['critical'])} critical</span>, "
                    f"<span class='badge amber'>{_e(r['findings']['warning'])} warning</span>")
        if rs:
            restore = (f"{_colour('green' if rs['passed'] else 'red', 'passed' if rs['passed'] else 'failed')} "
                       f"{_ago(rs['age_s'])}<div class='small muted'>RPO {summary.human_duration(rs['rpo_s'])}, "
                       f"RTO {summary.human_duration(rs['rto_s'])} (target {summary.human_duration(rs['rto_target_s'])})</div>")
        else:
            restore = "never"
        forecast = (f"{summary.human_duration(fc['projected_rto_s'])} in {_e(fc['horizon_days'])} d "
                    f"<span class='badge {'amber' if fc['over_target'] else 'green'}'>"
                    f"{'over' if fc['over_target'] else 'under'} target</span>"
                    if fc and summary.num(fc.get("projected_rto_s")) is not None else
                    f"<span class='small muted rto-not-enough-data'>{_e(fc['text'])}</span>" if fc else "—")
        loss = f"{r['days_until_loss']:.1f}" if summary.num(r["days_until_loss"]) is not None else "—"
        migration = (f"<a href='{base}/migration?cluster={quote(r['cluster'])}&run_id={quote(str(mig['run_id']))}'>"
                     f"{_colour(mig['colour'], mig['outcome'] or mig['status'])}</a>" if mig else "—")
        reasons = "".join(f"<li class='{_e(x['colour'])}'>{_e(x['text'])}</li>" for x in r["reasons"][1:4])
        reason_list = f"<ul class='reasons small'>{reasons}</ul>" if reasons else ""
        out.append(
            f"<tr class='cluster-row' data-cluster='{_e(r['cluster'])}' data-colour='{_e(r['colour'])}'>"
            f"<td><a class='cluster-link' href='{base}/clusters/{quote(r['cluster'])}'>{_e(r['cluster'])}</a></td>"
            f"<td>{_colour(r['colour'])}<div class='small'>{_e(r['reason'])}</div>"
            f"{reason_list}</td>"
            f"<td>{backup}</td><td>{window}</td><td>{findings}</td><td>{_replication_cell(r.get('replication'))}</td>"
            f"<td>{restore}</td><td>{forecast}</td>"
            f"<td>{loss}</td><td>{migration}</td></tr>")
    out.append("</tbody></table>")
    out.append(f"<p class='small muted'>Read from the reports in the bucket (cached for a minute) at "
               f"{datetime.now(UTC).strftime('%H:%M:%S UTC')}. JSON: <a href='{base}/api/fleet'>{base}/api/fleet</a></p>")
    return "".join(out)


def _replication_cell(rv: dict[str, Any] | None) -> str:
    """The fleet table's replication state with the client endpoint next to it (every value escaped)."""
    if not rv:
        return "—"
    roles = ", ".join(f"{_e(k)} {_e(v)}" for k, v in (rv.get("roles") or {}).items())
    primary = f"primary {rv.get('current_primary') or 'none'}"
    out = (f"<div class='replication'>{_colour(rv.get('colour') or 'green', primary)}"
           f"<div class='small muted'>{roles}</div></div>")
    ep = rv.get("endpoint")
    if ep:
        olds = "".join(f"<div class='small old-primary' data-fenced='{_e(o.get('fenced'))}'>{_e(o.get('text'))}</div>"
                       for o in ep.get("old_primaries") or [])
        out += (f"<div class='endpoint' data-state='{_e(ep.get('state'))}'>"
                f"{_colour(ep.get('colour') or 'green', 'endpoint')} <span class='small'>{_e(ep.get('endpoint'))} "
                f"{_e(ep.get('text'))}</span>{olds}</div>")
    return out


def _replication_html(rv: dict[str, Any] | None) -> str:
    """The cluster page's replication section: nodes, roles and instances, the endpoint, the fence, the fix."""
    if not rv:
        return ""
    ep = rv.get("endpoint") or {}
    instances = ep.get("instances") or {}
    rows = "".join(f"<tr><td>{_e(name)}</td><td>{_e(role)}</td><td>{_e((instances.get(name) or {}).get('instance_id'))}"
                   f"</td><td>{_e((instances.get(name) or {}).get('instance_state'))}</td></tr>"
                   for name, role in (rv.get("roles") or {}).items())
    primary = f"primary {rv.get('current_primary') or 'none'}"
    out = (f"<h2>Replication and endpoint</h2><div id='replication' data-colour='{_e(rv.get('colour'))}'>"
           f"{_colour(rv.get('colour') or 'green', primary)}"
           f"<span class='small muted'> (inventory: {_e(rv.get('inventory_primary'))})</span>"
           "<table><thead><tr><th>Node</th><th>Role</th><th>Instance</th><th>Instance state</th></tr></thead>"
           f"<tbody>{rows}</tbody></table></div>")
    if ep:
        olds = "".join(f"<li>{_e(o.get('text'))}</li>" for o in ep.get("old_primaries") or [])
        fix = f"<p class='small'>Fix: <code id='endpoint-fix'>{_e(ep['fix'])}</code></p>" if ep.get("fix") else ""
        out += (f"<div id='endpoint' data-state='{_e(ep.get('state'))}' data-colour='{_e(ep.get('colour'))}'>"
                f"<p>{_colour(ep.get('colour') or 'green', 'endpoint')} {_e(ep.get('endpoint'))} {_e(ep.get('text'))}</p>"
                f"{'<ul class=small>' + olds + '</ul>' if olds else ''}{fix}</div>")
    return out


def _cluster_html(r: dict[str, Any], tl: dict[str, Any], rto: dict[str, Any], migrations: list[dict[str, Any]],
                  base: str, days: int) -> str:
    reasons = "".join(f"<li>{_colour(x['colour'], '')} {_e(x['text'])}</li>" for x in r["reasons"])
    trend_text = f"RTO forecast: {rto['forecast']['text']}"  # the fleet table's figure, from the same function
    runs = "".join(f"<li>{_e(k)}: <a href='/dags/{quote(v['dag_id'])}/runs/{quote(v['run_id'])}' target='_top'>"
                   f"{_e(v['run_id'])}</a> {_e(v['state'])}"
                   + (f"<div class='progress'>{_e(v['progress'])}</div>" if v.get("progress") else "") + "</li>"
                   for k, v in (r.get("runs") or {}).items() if v)
    mig = "".join(f"<li><a href='{base}/migration?cluster={quote(r['cluster'])}&run_id={quote(str(m['run_id']))}'>"
                  f"{_e(m['run_id'])}</a> {_e(m['status'])} ({_e(m['outcome'])}, {_when(m['finished_at'])})</li>"
                  for m in migrations)
    return (f"<p><a href='{base}/'>← fleet</a></p>"
            f"<div id='cluster-state' data-colour='{_e(r['colour'])}'>{_colour(r['colour'])}<ul class='reasons'>{reasons}</ul></div>"
            f"{_replication_html(r.get('replication'))}"
            f"<h2>Recovery window, last {days} days</h2><div id='timeline'>{charts.timeline_svg(tl)}</div>"
            f"<p class='small muted'>{len(tl['backups'])} backup(s), {len(tl['gaps'])} WAL gap(s) in range. "
            f"Times of gaps are interpolated between known segment times. "
            f"<a href='{base}/api/clusters/{quote(r['cluster'])}/timeline?days={days}'>JSON</a></p>"
            f"<div class='charts'><div id='rto'><h2>RTO against database size</h2>{charts.rto_svg(rto)}"
            f"<p class='small muted'>{_e(trend_text)}</p></div>"
            f"<div><h2>Latest runs</h2><ul class='small'>{runs or '<li>none</li>'}</ul>"
            f"<h2>EBS migrations</h2><ul class='small' id='migrations'>{mig or '<li>none</li>'}</ul></div></div>")


def _migration_html(v: dict[str, Any], base: str) -> str:
    rows = "".join(
        f"<tr class='round-row'><td>{_e(r['index'])}</td><td>{_when(r['started_at'])}</td>"
        f"<td>{summary.human_duration(r['duration_s'])}</td><td>{summary.human_duration(r['predicted_duration_s'])}</td>"
        f"<td>{summary.human_bytes(r['delta_bytes'])}</td><td>{_e(r['decision'])}</td>"
        f"<td class='small'>{_e(r['reason'])}</td></tr>" for r in v["rounds"])
    reasons = "".join(f"<li>{_e(x)}</li>" for x in v["reasons"])
    init = v.get("initialization")
    # keys and values come from the report in the bucket: escaped like every other report value
    init_text = (", ".join(f"{_e(k)}: {_e(val)}" for k, val in init.items()) if isinstance(init, dict)
                 else _e(init or "—"))
    cluster = v.get("cluster") or ""
    return (f"<p><a href='{base}/clusters/{quote(cluster)}'>← {_e(cluster)}</a></p>"
            f"<div id='migration-state' data-colour='{_e(v['colour'])}'>{_colour(v['colour'], v['outcome'] or v['status'])}"
            f"<ul class='reasons'>{reasons}</ul></div>"
            f"<p>Run {_e(v['run_id'])} · migration {_e(v['migration_id'])}{' (dry run)' if v.get('dry_run') else ''} · "
            f"floor d* {summary.human_duration(v['floor_s'])} · downtime target {summary.human_duration(v['downtime_target_s'])} · "
            f"cutover downtime <b>{summary.human_duration(v['downtime_s'])}</b> · volume available "
            f"{summary.human_duration(v['cutover_to_volume_available_s'])} after the cutover · initialization {init_text}</p>"
            f"<p id='approval' data-decision='{_e(v.get('approval_decision') or '')}'>Cutover approval: "
            f"{_e(v.get('approval') or 'not recorded')}</p>"
            f"<div id='rounds'>{charts.rounds_svg(v)}</div>"
            "<table id='rounds-table'><thead><tr><th>Round</th><th>Started</th><th>Duration</th><th>Predicted</th>"
            f"<th>Delta</th><th>Then</th><th>Why</th></tr></thead><tbody>{rows}</tbody></table>")


def _widget_html(rows: list[dict[str, Any]], base: str) -> str:
    if not rows:
        return "<p class='muted small'>No pgops cluster you may read.</p>"
    items = "".join(f"<li class='widget-row' data-colour='{_e(r['colour'])}'><span class='dot {_e(r['colour'])}'></span>"
                    f"<a href='{base}/clusters/{quote(r['cluster'])}' target='_top'><b>{_e(r['cluster'])}</b></a> "
                    f"<span class='small' title='{_e(r['reason'])}'>{_e(r['reason'])}</span></li>" for r in rows)
    return f"<ul class='widget'>{items}</ul>"
