"""stop-writes helpers that need no server: the pg_ctl start command line."""

from pgops.dbhost.quiesce import pg_ctl_start_argv


def test_start_argv_in_the_data_dir():
    assert pg_ctl_start_argv("/pg/bin/pg_ctl", "/data/pg", log_file="/data/postgres.log",
                             config_file="/data/pg/postgresql.conf", timeout_s=60) == [
        "/pg/bin/pg_ctl", "-D", "/data/pg", "-l", "/data/postgres.log", "-w", "-t", "60", "start"]


def test_start_argv_with_a_config_file_elsewhere():
    argv = pg_ctl_start_argv("pg_ctl", "/var/lib/postgresql/15/main", log_file="/var/lib/postgresql/15/pg.log",
                             config_file="/etc/postgresql/15/main/postgresql.conf")
    assert argv[-3:] == ["-o", "-c config_file=/etc/postgresql/15/main/postgresql.conf", "start"]
