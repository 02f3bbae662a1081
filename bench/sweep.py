"""Sweep one system's knobs on the drain workload, to pick its best settings for this machine.

Run inside bench/.venv (``make venv`` or one ``run.py`` run creates it)::

    .venv/bin/python sweep.py pgqueuer --processes 1 --jobs 20000 \\
        --grid pgqueuer_managers_1=1,2,4 --grid pgqueuer_batch=10,50,100

Each ``--grid NAME=v1,v2`` is a ``systems.tunable`` knob (env ``BENCH_NAME``); every combination
runs ``--repeat`` times in a fresh database and prints the median drain rate.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", module="platformdirs")

from server import PostgresServer  # noqa: E402
from workloads import measure_enqueue_drain  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system")
    parser.add_argument("--grid", action="append", default=[], help="NAME=v1,v2,…")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    names = [item.split("=", 1)[0] for item in args.grid]
    values = [item.split("=", 1)[1].split(",") for item in args.grid]
    with PostgresServer() as server:
        for combination in itertools.product(*values):
            knobs = dict(zip(names, combination, strict=True))
            for name, value in knobs.items():
                os.environ[f"BENCH_{name.upper()}"] = value
            rates = []
            for repeat in range(args.repeat):
                result = measure_enqueue_drain(
                    server, args.system, f"sweep_{repeat}", args.jobs, args.processes, drain=True
                )
                rates.append(result["drain_jobs_per_s"])
            shown = " ".join(f"{k}={v}" for k, v in knobs.items())
            print(
                f"{args.system} processes={args.processes} {shown}: "
                f"median {statistics.median(rates):,.0f} jobs/s "
                f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
