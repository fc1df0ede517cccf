"""docker-compose.yaml and the Dockerfiles, checked without a Docker engine.

The compose file must validate against the Compose Specification schema after interpolation (as
`docker compose config` would do it), and agree with the inventory, the code's environment and the lock.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
# The Compose Specification's schema, copied into the repository (where from: compose-spec.README.md next to it)
SCHEMA = Path(__file__).resolve().parent / "compose-spec.json"
DOCKERFILES = {"airflow": REPO / "docker" / "airflow.Dockerfile", "dbhost": REPO / "docker" / "dbhost.Dockerfile"}
# Read only by the lab, the demo or the tests: a deployment never sets them.
LAB_OR_TEST_ONLY = re.compile(r"^PGOPS_(LAB_.*|TEST_.*|REPMGR_BIN|AWS_CALLS_FILE)$")
LONG_RUNNING = {"postgres", "redis", "s3", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                "airflow-triggerer", "airflow-worker", "dbhost", "dbhost-triggerer"}

_VAR = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|(?P<escaped>\$))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


class MissingVariable(KeyError):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation: $$ escapes, ${VAR}, $VAR, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ..."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def _one(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("plain"):
            return env.get(m.group("plain"), "")
        b = _BRACED.match(m.group("braced"))
        if not b:
            raise ValueError(f"invalid interpolation ${{{m.group('braced')}}}")
        name, op, arg = b.group("name"), b.group("op"), b.group("arg") or ""
        val, is_set = env.get(name), name in env
        if op == ":-":
            return val if val else interpolate(arg, env)
        if op == "-":
            return val if is_set else interpolate(arg, env)
        if op in (":?", "?"):
            if (op == ":?" and not val) or (op == "?" and not is_set):
                raise MissingVariable(f"{name}: {arg}")
            return val
        if op == ":+":
            return interpolate(arg, env) if val else ""
        if op == "+":
            return interpolate(arg, env) if is_set else ""
        return val or ""

    return _VAR.sub(_one, value)


def env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw):
    return interpolate(raw, env_file(ENV_EXAMPLE))


def test_validates_against_the_compose_spec(compose):
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_secrets_come_from_env_and_every_required_variable_is_in_the_example(raw):
    # With an empty environment, every ${VAR:?} fails: collect them; each must be in .env.example.
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", COMPOSE.read_text()))
    assert {"AIRFLOW_DB_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "S3_SECRET_KEY"} <= required
    with pytest.raises(MissingVariable):
        interpolate(raw, {})
    missing = required - set(env_file(ENV_EXAMPLE))
    assert not missing, f".env.example lacks {sorted(missing)}"
    # .env holds the real secrets: git must ignore it.
    res = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert res.returncode == 0, ".env is not ignored by git"
    # No literal secret in the compose file: every password-like value is an interpolation.
    for line in COMPOSE.read_text().splitlines():
        m = re.match(r"\s*([A-Z_]*(PASSWORD|SECRET|FERNET_KEY|JWT)[A-Z_]*):\s*(.+)", line)
        if m and not m.group(1).endswith("_FILE"):
            assert m.group(3).startswith("${"), f"literal secret in docker-compose.yaml: {m.group(1)}"


def test_only_the_api_server_publishes_a_port_on_loopback_by_default(compose):
    published = {name: svc["ports"] for name, svc in compose["services"].items() if svc.get("ports")}
    assert list(published) == ["airflow-apiserver"], published
    (port,) = published["airflow-apiserver"]
    assert port.startswith("127.0.0.1:"), port
    for name, svc in compose["services"].items():
        assert svc.get("network_mode") != "host", name


def test_healthchecks_and_ordered_start_up(compose):
    services = compose["services"]
    assert set(services) == LONG_RUNNING | {"airflow-init"}
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            want = "service_completed_successfully" if dep == "airflow-init" else "service_healthy"
            assert spec.get("condition") == want, f"{name} -> {dep}: {spec}"
    for name in LONG_RUNNING - {"postgres", "redis", "s3"}:
        assert "airflow-init" in services[name]["depends_on"], name
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"


def _queues(compose, component: str) -> dict[str, set[str]]:
    """Queues served per service by Celery workers (component "worker") or triggerers ("triggerer")."""
    out = {}
    for name, svc in compose["services"].items():
        cmd = svc.get("command") or []
        cmd = cmd.split() if isinstance(cmd, str) else list(cmd)
        if (component == "worker" and "celery" in cmd and "worker" in cmd) or (
                component == "triggerer" and "triggerer" in cmd):
            queues = {"default"}
            for flag in ("--queues", "-q"):
                if flag in cmd:
                    queues = set(cmd[cmd.index(flag) + 1].split(","))
            out[name] = queues
    return out


def test_worker_queues_match_the_example_inventory(compose):
    sys.path.insert(0, str(REPO / "plugins"))
    from pgops.inventory import load_inventory

    inventory = load_inventory(REPO / "include" / "clusters.example.yaml")
    wanted = {c.runner.queue for c in inventory.clusters} | {"default"}
    queues = _queues(compose, "worker")
    served = set().union(*queues.values())
    assert served == wanted, f"compose workers serve {sorted(served)}, the inventory needs {sorted(wanted)}"
    assert queues["airflow-worker"] == {"default"}
    for c in inventory.clusters:  # a local-runner cluster's queue is served on its DB host, nowhere else
        if c.runner.kind == "local":
            assert [n for n, q in queues.items() if c.runner.queue in q] == ["dbhost"], c.name
    # Triggers follow their task's queue: a triggerer serves each queue, the DB host's one inside dbhost.
    triggerers = _queues(compose, "triggerer")
    assert set().union(*triggerers.values()) == wanted, triggerers
    assert compose["x-airflow-common"]["environment"]["AIRFLOW__TRIGGERER__QUEUES_ENABLED"] == "true"
    dbt = compose["services"]["dbhost-triggerer"]
    assert dbt["network_mode"] == "service:dbhost" and dbt["pid"] == "service:dbhost"


def _env_vars_read_by_code() -> set[str]:
    names: set[str] = set()
    pattern = re.compile(r"""os\.(?:environ(?:\.get)?\(?\[?|getenv\()\s*["']([A-Z][A-Z0-9_]*)["']""")
    for root in ("plugins", "dags"):
        for path in (REPO / root).rglob("*.py"):
            text = path.read_text()
            names |= set(pattern.findall(text))
            names |= set(re.findall(r"\b(PGOPS_[A-Z0-9_]+)\b", text))
    names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (REPO / "include" / "clusters.example.yaml").read_text()))
    return names


def test_every_env_var_the_code_reads_is_set_for_a_deployment(compose):
    read = _env_vars_read_by_code()
    assert {"PGOPS_INVENTORY", "PGOPS_DBHOST_VENV", "PGOPS_PG_BIN"} <= read  # the scan works
    set_somewhere = set(env_file(ENV_EXAMPLE))
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        set_somewhere |= set(env if isinstance(env, dict) else (e.split("=", 1)[0] for e in env))
    for path in DOCKERFILES.values():
        set_somewhere |= set(re.findall(r"\b([A-Z][A-Z0-9_]*)=", " ".join(
            line for line in path.read_text().splitlines() if line.lstrip().startswith(("ENV", " ", "PGOPS", "AIRFLOW")))))
    missing = sorted(v for v in read - set_somewhere if not LAB_OR_TEST_ONLY.match(v)
                     and not v.startswith("AIRFLOW"))
    assert not missing, (f"the code reads {missing} but neither docker-compose.yaml, the Dockerfiles nor .env.example "
                         "set them. Fix: set them there, or list them in LAB_OR_TEST_ONLY if only the lab reads them")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_airflow_and_provider_versions_agree_with_the_lock(compose):
    lock = _lock()
    airflow = lock["apache-airflow"]
    base = re.search(r"^FROM apache/airflow:([0-9.]+)-python([0-9.]+)\s*$", DOCKERFILES["airflow"].read_text(), re.M)
    assert base, "docker/airflow.Dockerfile must start FROM apache/airflow:<version>-python<version>"
    assert base.group(1) == airflow == lock["apache-airflow-core"], (base.group(1), airflow)
    assert base.group(2) == "3.11" and 'requires-python = ">=3.11,<3.12"' in (REPO / "pyproject.toml").read_text()
    for name in ("apache-airflow-providers-celery", "apache-airflow-providers-ssh", "apache-airflow-providers-amazon",
                 "apache-airflow-providers-postgres", "apache-airflow-providers-fab"):
        assert name in lock, f"{name} is not in requirements.txt"
    for kind, path in DOCKERFILES.items():
        text = path.read_text()
        # Providers come from the lock: the image installs requirements.txt and pins nothing else.
        assert re.search(r"pip install [^\n]*-r [^\n]*requirements\.txt", text), f"{kind}: lock not installed"
        for pkg, version in re.findall(r"(apache-airflow[a-z-]*)==([0-9][^\s\"']*)", text):
            assert lock.get(pkg.lower()) == version, f"{path.name} pins {pkg}=={version}, the lock has {lock.get(pkg)}"
        for src in re.findall(r"^COPY (?:--chown=\S+ )?(\S+) ", text, re.M):
            assert (REPO / src).exists(), f"{path.name} copies {src}, which does not exist"
    assert "include/dbhost/requirements.txt" in DOCKERFILES["dbhost"].read_text()
    assert "postgresql-15" in DOCKERFILES["dbhost"].read_text()
    for name, svc in compose["services"].items():  # our images are tagged with the Airflow version
        image = svc.get("image", "")
        if image.startswith("pgops-"):
            assert image.endswith(f":{airflow}"), (name, image)


def test_scripts_the_services_run_exist_and_are_executable(compose):
    for rel in ("docker/airflow-init.sh", "docker/dbhost-entrypoint.sh"):
        path = REPO / rel
        assert path.exists() and path.stat().st_mode & 0o111, rel
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    assert compose["services"]["airflow-init"]["command"] == ["/opt/pgops/docker/airflow-init.sh"]


def test_init_writes_pools_and_names_missing_connections(tmp_path, monkeypatch):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env["PGOPS_INVENTORY"] = str(REPO / "include" / "clusters.example.yaml")
    pools = tmp_path / "pools.json"
    res = subprocess.run([sys.executable, "-m", "pgops.airflow.deploy", "init", "--pools-file", str(pools)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "connection 'pgops_main_pg' is not defined. Fix: set AIRFLOW_CONN_PGOPS_MAIN_PG" in res.stderr
    assert json.loads(pools.read_text()) == {"pgops_main": {"slots": 1, "include_deferred": False,
                                                             "description": "pgops: DB-host work of cluster main"}}
    env["AIRFLOW_CONN_PGOPS_MAIN_PG"] = json.dumps({"conn_type": "postgres", "host": "dbhost"})
    env["AIRFLOW_CONN_PGOPS_MAIN_AWS"] = json.dumps({"conn_type": "aws"})
    res = subprocess.run([sys.executable, "-m", "pgops.airflow.deploy", "init", "--pools-file", str(pools)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_managed_postgres_is_reachable_only_on_dbnet_with_its_own_s3_identity(compose, raw):
    services = compose["services"]
    on_dbnet = {name for name, svc in services.items() if "dbnet" in (svc.get("networks") or {})}
    # the DB host and the components whose tasks and triggers connect to it; not the UI, scheduler, DB, broker, S3
    assert on_dbnet == {"dbhost", "airflow-worker", "airflow-triggerer"}, on_dbnet
    dbhost = services["dbhost"]
    net = dbhost["networks"]["dbnet"]
    assert net["aliases"] == ["dbhost-pg"] and net["ipv4_address"] == compose["services"]["dbhost"]["environment"][
        "PGOPS_PG_LISTEN"].split(",")[1]
    subnet = compose["networks"]["dbnet"]["ipam"]["config"][0]["subnet"]
    env = dbhost["environment"]
    assert env["PGOPS_PG_CLIENT_CIDR"] == subnet and subnet != "0.0.0.0/0"
    assert env["PGOPS_PG_LISTEN"].split(",")[0] == "localhost" and "*" not in env["PGOPS_PG_LISTEN"]
    conn = json.loads(compose["x-airflow-common"]["environment"]["AIRFLOW_CONN_PGOPS_MAIN_PG"])
    assert conn["host"] == "dbhost-pg"  # the dbnet alias, the address PostgreSQL listens on
    # the DB host's S3 keys are its own, not the Airflow connection's
    aws = json.loads(compose["x-airflow-common"]["environment"]["AIRFLOW_CONN_PGOPS_MAIN_AWS"])
    assert env["AWS_ACCESS_KEY_ID"] != aws["login"] and env["AWS_SECRET_ACCESS_KEY"] != aws["password"]
    assert "${DBHOST_S3_ACCESS_KEY" in COMPOSE.read_text()
    s3_cmd = " ".join(services["s3"]["command"])
    assert '"name":"pgops-dbhost"' in s3_cmd and s3_cmd.count('"Admin"') == 1  # the DB host's identity: no Admin
    entry = (REPO / "docker" / "dbhost-entrypoint.sh").read_text()
    assert "listen_addresses = '*'" not in entry and "0.0.0.0/0 scram" not in entry.replace("0\\.0\\.0\\.0\\/0", "")
    assert 'runuser -u postgres -- "${pg_env[@]}" "$PG_BIN/pg_ctl"' in entry  # started with env -i (see
    # tests/deploy/test_dbhost_entrypoint.py, which runs it and reads the postmaster's environment)


# compose service -> the component of pgops.lab.airflow_stack.celery_commands() it runs (for the example's queue)
SERVICE_COMPONENTS = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                      "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
                      "airflow-worker": "worker", "dbhost": "dbhost-worker:dbhost_main",
                      "dbhost-triggerer": "dbhost-triggerer:dbhost_main"}


def _airflow_args(svc: dict) -> list[str]:
    cmd = svc["command"]
    cmd = cmd.split() if isinstance(cmd, str) else list(cmd)
    return cmd[1:] if cmd[:1] == ["airflow"] else cmd  # the Airflow image's entrypoint prepends `airflow`


def test_services_run_the_commands_the_celery_test_starts(compose, tmp_path):
    """tests/lab/test_celery.py proves celery_commands() on real processes; compose must run the same ones, and the
    lab may add only its loopback and one-machine arguments."""
    sys.path.insert(0, str(REPO / "plugins"))
    from pgops.lab.airflow_stack import LAB_ONLY_ARGS, CeleryStack, celery_commands

    expected = celery_commands(["dbhost_main"])
    assert set(SERVICE_COMPONENTS.values()) == set(expected)
    for service, component in SERVICE_COMPONENTS.items():
        args = _airflow_args(compose["services"][service])
        assert args == expected[component], (service, args, expected[component])
        assert not set(args) & set(LAB_ONLY_ARGS), service
    # every other service runs no Airflow component
    others = set(compose["services"]) - set(SERVICE_COMPONENTS)
    assert others == {"postgres", "redis", "s3", "airflow-init"}
    stack = CeleryStack(tmp_path, sql_alchemy_conn="postgresql://x@127.0.0.1/x", result_backend="db+postgresql://x",
                        dbhost_queues=["dbhost_main"])
    assert stack.commands() == expected
    for component in expected:
        extra = stack.lab_args(component, 8080)
        assert set(extra[::2]) <= set(LAB_ONLY_ARGS), (component, extra)
    dockerfile_cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILES["dbhost"].read_text(), re.M)
    assert json.loads(dockerfile_cmd.group(1))[1:] == expected["dbhost-worker:dbhost_main"]


def test_login_is_the_fab_auth_manager_with_the_pgops_roles(compose):
    env = compose["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__AUTH_MANAGER"] == "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
    assert not [k for k in env if "SIMPLE_AUTH_MANAGER" in k]
    init = (REPO / "docker" / "airflow-init.sh").read_text()
    # roles after the migration (FAB's tables), the admin after the roles, its password from the environment only
    assert init.index("airflow db migrate") < init.index("pgops.airflow.fab_roles sync") < init.index("pgops.airflow.fab_roles user")
    assert "--password-env AIRFLOW_ADMIN_PASSWORD" in init and "--password " not in init
    assert compose["services"]["airflow-init"]["environment"]["AIRFLOW_ADMIN_PASSWORD"]


def test_redis_password_is_not_on_a_command_line(compose, raw):
    redis = raw["services"]["redis"]
    text = json.dumps([redis.get("command"), redis.get("entrypoint"), redis["healthcheck"]["test"]])
    assert "--requirepass" not in text and " -a " not in text and "REDIS_PASSWORD:?" not in text
    assert "requirepass" in text and "REDISCLI_AUTH" in text
