# A database host: PostgreSQL 15 (Debian), the barman-cloud tools venv, and an Airflow Celery worker that
# serves this host's queue. Build context: the repository root.
FROM debian:12-slim

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
COPY include/dbhost/apt-packages.txt /tmp/apt-packages.txt
# The image runs its own cluster: the package must not create a default one.
RUN mkdir -p /etc/postgresql-common \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
 && apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends postgresql-15 postgresql-client-15 python3 python3-venv \
      gcc libpq-dev python3-dev procps ca-certificates curl \
      $(sed -e 's/#.*//' /tmp/apt-packages.txt | xargs) \
 && rm -rf /var/lib/apt/lists/* /tmp/apt-packages.txt

# DB-host tools venv (barman-cloud), from the system python3 (3.11), readable by the postgres user.
# The pgops DB-host tools (pgops-wal-archive, pgops-wal-restore) are installed into it as a package.
COPY include/dbhost/requirements.txt /opt/pgops/include/dbhost/requirements.txt
RUN python3 -m venv /opt/pgops/dbhost-venv \
 && /opt/pgops/dbhost-venv/bin/pip install --no-cache-dir -r /opt/pgops/include/dbhost/requirements.txt
COPY include/dbhost/pyproject.toml include/dbhost/*.py /tmp/pgops-dbhost/
RUN /opt/pgops/dbhost-venv/bin/pip install --no-cache-dir --no-deps /tmp/pgops-dbhost \
 && rm -rf /tmp/pgops-dbhost \
 && chmod -R a+rX /opt/pgops/dbhost-venv

# The Airflow worker (same lock as the Airflow image: apache-airflow==3.3.2 and its providers) in its own venv.
COPY requirements.txt /opt/pgops/requirements.txt
RUN python3 -m venv /opt/airflow-venv \
 && /opt/airflow-venv/bin/pip install --no-cache-dir -r /opt/pgops/requirements.txt
COPY pyproject.toml /opt/pgops/pyproject.toml
COPY plugins /opt/pgops/plugins
COPY dags /opt/pgops/dags
COPY include /opt/pgops/include
COPY docker /opt/pgops/docker
RUN /opt/airflow-venv/bin/pip install --no-cache-dir --no-deps -e /opt/pgops \
 && mkdir -p /opt/airflow/logs \
 && install -d -o postgres -g postgres -m 0755 /var/tmp/pgops-restore \
 && chown -R postgres:0 /opt/airflow && chmod -R g+rwX /opt/airflow \
 && usermod -a -G root postgres

ENV PATH=/opt/airflow-venv/bin:/usr/lib/postgresql/15/bin:$PATH \
    AIRFLOW_HOME=/opt/airflow \
    PGOPS_DBHOST_VENV=/opt/pgops/dbhost-venv \
    PGOPS_PG_BIN=/usr/lib/postgresql/15/bin \
    PGDATA=/var/lib/postgresql/15/main
EXPOSE 5432
ENTRYPOINT ["/opt/pgops/docker/dbhost-entrypoint.sh"]
# pgops.lab.airflow_stack.celery_commands(["dbhost_main"]): task logs go to the shared log volume, no log server
CMD ["airflow", "celery", "worker", "--queues", "dbhost_main", "--concurrency", "2", "--skip-serve-logs"]
