"""Where a drain's CPU goes: the pgqueue worker process against the PostgreSQL backends.

    bench/.venv/bin/python bench/cpu_split.py [--jobs 200000] [--pg 18] [--py-spy out.txt]

Bulk-enqueues no-op jobs, drains them with one in-process worker (the settings of the main
benchmark), and reports the wall time, the worker's CPU time and the CPU time of every process
of the benchmark's own PostgreSQL server (read from /proc, Linux only), per job. With
``--py-spy FILE`` it also records a raw py-spy profile of the worker (py-spy must be on PATH).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time

import psycopg
from noop_drain import drain
from server import PostgresServer

import pgqueue
from pgqueue import migrate


class ServerCpu:
    """CPU seconds used by a postmaster and its children, sampled so exiting backends count."""

    def __init__(self, postmaster: int) -> None:
        self._postmaster = postmaster
        self._seen: dict[int, float] = {}
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
        # CPU the sampling thread itself used, to subtract from this process's time.
        self.own_cpu = 0.0

    def _sample(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, parent = int(name), int(fields[1])
            if self._postmaster in (pid, parent):
                used = (int(fields[11]) + int(fields[12])) / self._tick
                self._seen[pid] = max(self._seen.get(pid, 0.0), used)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()
        self.own_cpu = time.thread_time()

    def total(self) -> float:
        self._sample()
        return sum(self._seen.values())

    def __enter__(self) -> ServerCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description="worker vs PostgreSQL CPU per drained job")
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--pg", type=int, default=18)
    parser.add_argument("--py-spy", dest="py_spy", default=None)
    args = parser.parse_args()
    with PostgresServer(major=args.pg) as server:
        dsn = server.create_database("bench_cpu")
        migrate.upgrade(dsn)
        with psycopg.connect(dsn) as conn:
            for start in range(0, args.jobs, 50_000):
                count = min(50_000, args.jobs - start)
                jobs = [("noop", {"i": start + i}) for i in range(count)]
                pgqueue.enqueue_many(conn, jobs, queue="bench")
                conn.commit()
        postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        spy = None
        if args.py_spy:
            command = ["py-spy", "record", "-r", "200", "-f", "raw", "-o", args.py_spy]
            spy = subprocess.Popen([*command, "-p", str(os.getpid())])
            time.sleep(1)
        with ServerCpu(postmaster) as server_cpu:
            before = server_cpu.total()
            began, cpu_began = time.perf_counter(), time.process_time()
            drain(dsn, args.jobs)
            wall = time.perf_counter() - began
            worker_cpu = time.process_time() - cpu_began
            postgres_cpu = server_cpu.total() - before
        worker_cpu -= server_cpu.own_cpu
        if spy is not None:
            spy.wait(timeout=60)
    print(
        f"jobs={args.jobs} wall_s={wall:.2f} jobs_per_s={args.jobs / wall:,.0f} "
        f"worker_cpu_s={worker_cpu:.2f} postgres_cpu_s={postgres_cpu:.2f}"
    )
    print(
        f"per job: worker {worker_cpu / args.jobs * 1e6:.1f} us, "
        f"PostgreSQL {postgres_cpu / args.jobs * 1e6:.1f} us"
    )


if __name__ == "__main__":
    main()
