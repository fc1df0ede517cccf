"""Airflow: DAG factories, operators, sensors, triggers, hooks, the dashboard, and the audit, replication,
progress, deadline, role and deployment pieces they run."""
