"""Drive one benchmark run: start PostgreSQL, preflight each system, interleave the repeats."""

from __future__ import annotations

import argparse
import datetime
import functools
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import report
import systems
from report import Record
from server import SERVER_SETTINGS, PostgresServer
from workloads import measure_enqueue_drain, measure_latency, measure_sustained

PREFLIGHT_JOBS = 200
RESULTS = Path(__file__).resolve().parent / "results"


def preflight(server: PostgresServer, name: str) -> str | None:
    """A 200-job enqueue and drain; returns why the system cannot run, or None when it can."""
    try:
        result = measure_enqueue_drain(
            server, name, f"bench_preflight_{name}", PREFLIGHT_JOBS, 1, drain=True
        )
    except Exception as exc:  # any failure means "skip this system", with the reason shown
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return last
    if result["missing"] or result["duplicates"]:
        return f"delivery check failed: {result}"
    return None


def measure(label: str, record: Record, run: Callable[[], dict[str, Any]]) -> Record:
    started = time.monotonic()
    print(f"{label} ...", end=" ", flush=True)
    try:
        record.metrics = {k: float(v) for k, v in run().items()}
        shown = report.SHOWN[record.workload][:2]
        summary = " ".join(
            f"{m}={report.fmt(record.metrics[m])}" for m in shown if m in record.metrics
        )
        print(f"{summary} ({time.monotonic() - started:.0f} s)", flush=True)
    except Exception as exc:  # a failed run is recorded and reported, the others go on
        record.error = traceback.format_exception_only(type(exc), exc)[-1].strip()
        print(f"FAILED: {record.error}", flush=True)
    return record


Step = tuple[str, Record, Callable[[], dict[str, Any]]]


def plan(server: PostgresServer, args: argparse.Namespace, runnable: list[str]) -> list[Step]:
    """Every measurement of the run, repeats interleaved across systems."""
    steps: list[Step] = []
    does_drain = "drain" in args.workloads
    for repeat in range(1, args.repeat + 1):
        tag = f"[{repeat}/{args.repeat}]"
        for name in runnable:
            if does_drain or "enqueue" in args.workloads:
                workload = "drain" if does_drain else "enqueue"
                for processes in args.processes if does_drain else [0]:
                    database = f"bench_{name}_{workload}_{processes}_{repeat}"
                    steps.append(
                        (
                            f"{tag} {name} {workload} jobs={args.jobs} processes={processes}",
                            Record(name, workload, processes, repeat),
                            functools.partial(
                                measure_enqueue_drain,
                                server,
                                name,
                                database,
                                args.jobs,
                                max(processes, 1),
                                does_drain,
                                args.analyze,
                            ),
                        )
                    )
            if "latency" in args.workloads:
                steps.append(
                    (
                        f"{tag} {name} latency jobs={args.latency_jobs} at {args.latency_rate:g}/s",
                        Record(name, "latency", 1, repeat),
                        functools.partial(
                            measure_latency,
                            server,
                            name,
                            f"bench_{name}_latency_{repeat}",
                            args.latency_jobs,
                            args.latency_rate,
                        ),
                    )
                )
            if "sustained" in args.workloads:
                processes = max(args.processes)
                steps.append(
                    (
                        f"{tag} {name} sustained jobs={args.sustained_jobs} processes={processes}",
                        Record(name, "sustained", processes, repeat),
                        functools.partial(
                            measure_sustained,
                            server,
                            name,
                            f"bench_{name}_sustained_{repeat}",
                            args.sustained_jobs,
                            processes,
                            args.analyze,
                        ),
                    )
                )
    return steps


def run_all(args: argparse.Namespace, versions: dict[str, str], machine: dict[str, Any]) -> int:
    started_at = datetime.datetime.now(datetime.timezone.utc)
    print(
        f"pgqueue benchmark {started_at:%Y-%m-%d %H:%M} UTC on {machine['cpus']} CPUs "
        f"({machine['cpu']}); packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        flush=True,
    )
    if args.analyze:
        print("NOTE: --analyze: ANALYZE runs after each bulk enqueue; not the issue's figures")
    with PostgresServer(major=args.pg) as server:
        print(
            f"server: {server.version}; "
            + ", ".join(f"{k}={v}" for k, v in SERVER_SETTINGS.items())
        )
        runnable: list[str] = []
        for name in args.systems:
            reason = preflight(server, name)
            if reason:
                print(f"SKIP {name}: {reason}", flush=True)
            else:
                runnable.append(name)
        settings = {
            name: {str(p): systems.load(name).settings(p) for p in args.processes}
            for name in runnable
        }
        for name, per_process in settings.items():
            for processes, knobs in per_process.items():
                print(
                    f"settings {name} processes={processes}: "
                    + ", ".join(f"{k}={v}" for k, v in knobs.items())
                )

        records = [
            measure(label, record, run) for label, record, run in plan(server, args, runnable)
        ]

    report.print_tables(records)
    lines = report.headline(records, runnable)
    report.print_headline(lines)
    meta = {
        "started_at": started_at.isoformat(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine,
        "postgres": server.version,
        "server_settings": SERVER_SETTINGS,
        "packages": versions,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "system_settings": settings,
        "skipped": [name for name in args.systems if name not in runnable],
    }
    out = args.out or RESULTS / f"bench-{started_at:%Y%m%dT%H%M%SZ}.json"
    report.write_json(out, meta, records, lines)
    print(f"\nresults: {out}")
    return 1 if any(record.error for record in records) else 0
