# Airflow image for pgops: the official Airflow image plus our lock and the pgops package.
# Build context: the repository root (docker compose build does this).
FROM apache/airflow:3.3.2-python3.11

USER root
# psql/pg_isready for checks and the restore host's client tools; curl for the healthchecks.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-client curl \
 && rm -rf /var/lib/apt/lists/*
USER airflow

# One resolution for Airflow 3.3.2 and its providers (amazon, postgres, ssh, celery): requirements.txt is
# our lock (`make lock`). apache-airflow==3.3.2 is pinned in it, so pip keeps the image's Airflow.
COPY --chown=airflow:0 requirements.txt /opt/pgops/requirements.txt
RUN pip install --no-cache-dir -r /opt/pgops/requirements.txt

# The pgops package, editable so REPO_ROOT (dags, include/sql) resolves to /opt/pgops.
COPY --chown=airflow:0 pyproject.toml /opt/pgops/pyproject.toml
COPY --chown=airflow:0 plugins /opt/pgops/plugins
COPY --chown=airflow:0 dags /opt/pgops/dags
COPY --chown=airflow:0 include /opt/pgops/include
COPY --chown=airflow:0 docker /opt/pgops/docker
RUN pip install --no-cache-dir --no-deps -e /opt/pgops

ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/pgops/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/pgops/plugins \
    PGOPS_INVENTORY=/opt/pgops/include/clusters.example.yaml
