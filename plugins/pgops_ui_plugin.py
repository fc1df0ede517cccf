"""Airflow plugin: the recoverability dashboard (pgops.airflow.ui) at /pgops, a "Recoverability" nav entry, a rounds view
on EBS-migration runs and a widget on the home dashboard.

The class lives here, at the top of plugins/, because Airflow's loader imports every .py file under plugins/
by its bare name: a plugin class inside the pgops package would be found twice.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from pgops.airflow.ui.api import URL_PREFIX, create_app


class PgopsDashboardPlugin(AirflowPlugin):
    name = "pgops_dashboard"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "pgops recoverability"}]
    external_views = [
        {"name": "Recoverability", "href": f"{URL_PREFIX}/", "url_route": "recoverability", "destination": "nav",
         "nav_top_level": True},
        # shown on every DAG run; the page explains itself on runs that are not pgops_ebs_migration__*
        {"name": "EBS migration rounds", "href": f"{URL_PREFIX}/migration?dag_id={{DAG_ID}}&run_id={{RUN_ID}}",
         "url_route": "pgops-migration", "destination": "dag_run"},
    ]
    react_apps = [
        {"name": "pgops recoverability", "bundle_url": f"{URL_PREFIX}/static/widget.js", "destination": "dashboard",
         "url_route": "pgops-recoverability-widget"},
    ]
