#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine (root, or a user with sudo): system packages, the Airflow
# venv (.venv) from requirements.txt, and the DB-host tools venv (barman-cloud) from include/dbhost/.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DBHOST_VENV=${PGOPS_DBHOST_VENV:-/opt/pgops/dbhost-venv}
UV_VERSION=0.13.9

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi

# --- system packages ------------------------------------------------------------------------------
apt_pkgs=(postgresql-15 postgresql-client-15 gcc libpq-dev python3-dev python3-venv openssl procps iproute2)
# DB-host tools (pgBackRest, repmgr, sshd for the ssh runner) and what the tests need (chromium).
for list in include/dbhost/apt-packages.txt include/test-apt-packages.txt; do
  [ -f "$list" ] || continue
  while read -r line; do
    line=${line%%#*}; line=$(echo "$line" | xargs); [ -n "$line" ] && apt_pkgs+=("$line")
  done < "$list"
done
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  # The lab runs its own clusters: don't let the package create and start a default one.
  $SUDO mkdir -p /etc/postgresql-common
  if [ ! -f /etc/postgresql-common/createcluster.conf ] || ! grep -q "^create_main_cluster" /etc/postgresql-common/createcluster.conf; then
    echo "create_main_cluster = false" | $SUDO tee -a /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- uv ---------------------------------------------------------------------------------------------
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install -q "uv==${UV_VERSION}" 2>/dev/null || python3 -m pip install -q --user "uv==${UV_VERSION}"
  export PATH="$HOME/.local/bin:$PATH"
fi

# --- Airflow venv ---------------------------------------------------------------------------------------
stamp=.venv/.pgops-lock-$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || uv venv -q --python 3.11 .venv
  uv pip sync -q --python .venv/bin/python requirements.txt
  uv pip install -q --python .venv/bin/python --no-deps -e .
  rm -f .venv/.pgops-lock-*; touch "$stamp"
fi

# --- DB-host tools venv (barman-cloud and the pgops DB-host tools), readable by the postgres OS user -------
# The tools (include/dbhost: pgops-backup, pgops-wal-archive, pgops-wal-restore, pgops-restore) are installed as a package, not run from
# this checkout: PostgreSQL runs them as the postgres OS user, who may not be able to read a clone in a 0700
# home. The stamp covers the lock, every source of the package and this script, so an edited tool is reinstalled.
# Bytecode is compiled at install: the postgres user cannot write __pycache__ here, and without it every
# archive_command and restore_command call would compile its modules again (10 ms for pgops-wal-archive alone,
# far more for barman's).
dbsum=$(cat include/dbhost/requirements.txt include/dbhost/pyproject.toml include/dbhost/*.py scripts/setup.sh \
  | sha256sum | cut -c1-16)
dbstamp="$DBHOST_VENV/.pgops-lock-$dbsum"
if [ ! -f "$dbstamp" ]; then
  $SUDO mkdir -p "$(dirname "$DBHOST_VENV")"
  [ -n "$SUDO" ] && $SUDO chown "$(id -u)" "$(dirname "$DBHOST_VENV")"
  [ -x "$DBHOST_VENV/bin/python" ] || uv venv -q --python /usr/bin/python3 "$DBHOST_VENV"
  uv pip sync -q --compile-bytecode --python "$DBHOST_VENV/bin/python" include/dbhost/requirements.txt
  # Built from a copy: the build leaves nothing in the checkout, and no cache keeps an older build.
  build=$(mktemp -d); trap 'rm -rf "$build"' EXIT
  cp include/dbhost/pyproject.toml include/dbhost/*.py "$build"/
  uv pip install -q --no-cache --compile-bytecode --python "$DBHOST_VENV/bin/python" --no-deps --reinstall "$build"
  rm -rf "$build"; trap - EXIT
  chmod -R a+rX "$DBHOST_VENV"
  for tool in pgops-backup pgops-wal-archive pgops-wal-restore pgops-restore; do
    [ -x "$DBHOST_VENV/bin/$tool" ] || { echo "setup: $DBHOST_VENV/bin/$tool was not installed" >&2; exit 1; }
  done
  rm -f "$DBHOST_VENV"/.pgops-lock-*; touch "$dbstamp"
fi
echo "setup: ready (.venv, $DBHOST_VENV)"
