"""LocalPostgres runs a real server: start, reuse, crash-stop and restart keep data and port."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgqueue.embedded import SYSTEM_USER, LocalPostgres, default_data_dir

DEBIAN_15 = Path("/usr/lib/postgresql/15/bin")
# Not synchronous_commit=off: an immediate stop (a crash) would lose acknowledged commits.
FAST_SETTINGS = {"fsync": "off", "full_page_writes": "off"}

BINARIES = [
    pytest.param(None, id="embedded-wheel"),
    pytest.param(
        DEBIAN_15,
        id="debian-15",
        marks=pytest.mark.skipif(
            not (DEBIAN_15 / "postgres").exists(), reason="no PostgreSQL 15 at " + str(DEBIAN_15)
        ),
    ),
]


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: each pytest run resets /tmp/pytest-of-<user> to 0700, which locks the
    # server user (when we run as root) out of a data dir below it, mid-test, if runs overlap.
    folder = Path(tempfile.mkdtemp(prefix="pgqueue-test-embedded-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=BINARIES)
def server(request: pytest.FixtureRequest, scratch_dir: Path) -> Iterator[LocalPostgres]:
    local = LocalPostgres(scratch_dir / "data", bin_dir=request.param, settings=FAST_SETTINGS)
    yield local
    local.stop("immediate")


def query_one(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_serves_the_major_version_of_its_binaries(server: LocalPostgres) -> None:
    server.start()

    version_num = int(str(query_one(server.dsn(), "SHOW server_version_num")))

    assert server.is_running()
    assert version_num // 10000 == server.major_version()
    assert query_one(server.dsn(), "SHOW listen_addresses") == "127.0.0.1"
    assert query_one(server.dsn(), "SHOW fsync") == "off"
    assert query_one(server.dsn(), "SHOW max_connections") == "200"
    assert query_one(server.dsn(), "SHOW server_encoding") == "UTF8"


def test_unix_socket_in_data_dir_answers(server: LocalPostgres) -> None:
    server.start()

    unix_dsn = f"host={server.data_dir} port={server.port} user=postgres dbname=postgres"

    assert query_one(unix_dsn, "SELECT 1") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="only root needs a separate server user")
def test_as_root_the_server_runs_as_the_system_user(server: LocalPostgres) -> None:
    server.start()

    owner = (server.data_dir / "postmaster.pid").stat().st_uid

    assert owner == pwd.getpwnam(SYSTEM_USER).pw_uid != 0


def test_immediate_stop_and_restart_keep_data_and_port(server: LocalPostgres) -> None:
    server.start()
    port = server.port
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (value int)")
        conn.execute("INSERT INTO kept VALUES (42)")

    server.stop("immediate")

    assert not server.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.dsn(), connect_timeout=2).close()
    server.start()
    assert server.port == port
    assert query_one(server.dsn(), "SELECT value FROM kept") == 42


def test_a_new_object_on_a_stopped_data_dir_remembers_the_port(server: LocalPostgres) -> None:
    server.start()
    server.stop()

    again = LocalPostgres(server.data_dir, bin_dir=server.bin_dir)

    assert again.port == server.port
    with again:
        assert query_one(again.dsn(), "SELECT 1") == 1
    assert not again.is_running()


def test_a_second_object_reuses_the_running_server_and_leaves_it_running(
    server: LocalPostgres,
) -> None:
    server.start()
    pid = (server.data_dir / "postmaster.pid").read_text().splitlines()[0]

    with LocalPostgres(server.data_dir, bin_dir=server.bin_dir, port=1) as other:
        assert other.port == server.port
        assert query_one(other.dsn(), "SELECT pg_backend_pid() > 0") is True

    assert server.is_running()
    assert (server.data_dir / "postmaster.pid").read_text().splitlines()[0] == pid


def test_restart_brings_the_server_back(server: LocalPostgres) -> None:
    server.start()
    before = query_one(server.dsn(), "SELECT pg_postmaster_start_time()")

    server.restart("immediate")

    assert query_one(server.dsn(), "SELECT pg_postmaster_start_time()") != before


def test_start_failure_reports_the_server_log(scratch_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        local = LocalPostgres(scratch_dir / "data", port=taken)

        with pytest.raises(RuntimeError, match="did not start") as failure:
            local.start()

    assert "Address already in use" in str(failure.value)
    assert not local.is_running()


@pytest.mark.skipif(not (DEBIAN_15 / "postgres").exists(), reason="no PostgreSQL 15 binaries")
def test_refuses_a_data_dir_of_another_major_version(scratch_dir: Path) -> None:
    with LocalPostgres(scratch_dir / "data", settings=FAST_SETTINGS) as newer:
        newer_major = newer.major_version()

    older = LocalPostgres(scratch_dir / "data", bin_dir=DEBIAN_15)

    with pytest.raises(RuntimeError, match=f"holds a PostgreSQL {newer_major} cluster"):
        older.start()


def test_rejects_settings_it_manages_itself(scratch_dir: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        LocalPostgres(scratch_dir, settings={"port": "5432"})


def test_dsn_is_a_tcp_url_for_the_superuser(scratch_dir: Path) -> None:
    local = LocalPostgres(scratch_dir / "data", port=54321)

    assert local.dsn("app") == "postgresql://postgres@127.0.0.1:54321/app"


def test_default_data_dir_is_under_the_working_directory(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(scratch_dir)

    assert default_data_dir() == scratch_dir / ".pgqueue" / "postgres"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands folders to a server user")
def test_stop_works_after_a_parent_folder_was_closed_again(
    server: LocalPostgres, scratch_dir: Path
) -> None:
    server.start()
    scratch_dir.chmod(0o700)  # as pytest does to its temporary root at the start of each run

    server.stop()

    assert not server.is_running()
