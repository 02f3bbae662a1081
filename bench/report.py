"""Turn raw measurements into medians with min-max, the per-system summary lines and the JSON."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Per workload: the metrics shown in the tables, in order. Rates are jobs per second.
SHOWN = {
    "enqueue": ["enqueue_jobs_per_s"],
    "drain": ["drain_jobs_per_s", "enqueue_jobs_per_s", "missing", "duplicates"],
    "latency": ["p50_ms", "p99_ms", "max_ms", "enqueue_call_p50_ms", "missing", "duplicates"],
    "sustained": [
        "first10_jobs_per_s",
        "last10_jobs_per_s",
        "last_vs_first",
        "sustained_jobs_per_s",
        "missing",
        "duplicates",
    ],
}


@dataclass
class Record:
    """One measurement: a system, a workload, a process count, a repeat."""

    system: str
    workload: str
    processes: int
    repeat: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self) -> str:
        if self.count == 1 or self.low == self.high:
            return fmt(self.median)
        return f"{fmt(self.median)} [{fmt(self.low)}-{fmt(self.high)}]"


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


Key = tuple[str, str, int]  # system, workload, processes


def spreads(records: list[Record]) -> dict[Key, dict[str, Spread]]:
    values: dict[Key, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for metric, value in record.metrics.items():
            values[(record.system, record.workload, record.processes)][metric].append(value)
    return {key: {m: Spread.of(v) for m, v in metrics.items()} for key, metrics in values.items()}


def print_tables(records: list[Record]) -> None:
    table = spreads(records)
    for workload, metrics in SHOWN.items():
        keys = sorted(key for key in table if key[1] == workload)
        if not keys:
            continue
        print(f"\n== {workload}: median [min-max] over repeats")
        header = ["system", "procs", *metrics]
        rows = [header]
        for key in keys:
            row = [key[0], str(key[2])]
            row += [table[key][m].text() if m in table[key] else "-" for m in metrics]
            rows.append(row)
        widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    failures = [r for r in records if r.error]
    for record in failures:
        print(
            f"FAILED {record.system} {record.workload} procs={record.processes} "
            f"repeat={record.repeat}: {record.error}"
        )


def headline(records: list[Record], systems: list[str]) -> dict[str, dict[str, float]]:
    """Per system: enqueue and best-process-count drain medians, latency medians, sustained."""
    table = spreads(records)
    result: dict[str, dict[str, float]] = {}
    for system in systems:
        line: dict[str, float] = {}
        enqueue = [
            r.metrics["enqueue_jobs_per_s"]
            for r in records
            if r.system == system
            and "enqueue_jobs_per_s" in r.metrics
            and r.workload in ("enqueue", "drain")
        ]
        if enqueue:
            line["enqueue_jobs_per_s"] = statistics.median(enqueue)
        drains = [
            (spread["drain_jobs_per_s"].median, key[2])
            for key, spread in table.items()
            if key[0] == system and key[1] == "drain" and "drain_jobs_per_s" in spread
        ]
        if drains:
            best, processes = max(drains)
            line["drain_jobs_per_s"] = best
            line["drain_processes"] = processes
        for key, spread in table.items():
            if key[0] != system:
                continue
            if key[1] == "latency":
                line["p50_ms"] = spread["p50_ms"].median
                line["p99_ms"] = spread["p99_ms"].median
            if key[1] == "sustained":
                line["sustained_last_vs_first"] = spread["last_vs_first"].median
        result[system] = line
    return result


RATIO_METRICS = ["enqueue_jobs_per_s", "drain_jobs_per_s", "p50_ms", "p99_ms"]


def ratios(lines: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """pgqueue divided by each peer, metric by metric (latency: lower is better)."""
    mine = lines.get("pgqueue", {})
    out: dict[str, dict[str, float]] = {}
    for peer in ("pgqueuer", "reference"):
        theirs = lines.get(peer, {})
        common = [m for m in RATIO_METRICS if m in mine and m in theirs and theirs[m]]
        if common:
            out[f"pgqueue/{peer}"] = {m: mine[m] / theirs[m] for m in common}
    return out


def print_headline(lines: dict[str, dict[str, float]]) -> None:
    print()
    for system, line in lines.items():
        cells = [f"system={system}"]
        for metric in ["enqueue_jobs_per_s", "drain_jobs_per_s", "p50_ms", "p99_ms"]:
            value = line.get(metric)
            cells.append(f"{metric}={'n/a' if value is None else fmt(value).replace(',', '')}")
        if "drain_processes" in line:
            cells.append(f"drain_processes={int(line['drain_processes'])}")
        if "sustained_last_vs_first" in line:
            cells.append(f"sustained_last_vs_first={line['sustained_last_vs_first']:.2f}")
        print(" ".join(cells))
    for name, values in ratios(lines).items():
        print(f"ratio {name} " + " ".join(f"{m}={v:.2f}" for m, v in values.items()))


def write_json(
    path: Path, meta: dict[str, Any], records: list[Record], lines: dict[str, dict[str, float]]
) -> None:
    table = spreads(records)
    summary = [
        {
            "system": k[0],
            "workload": k[1],
            "processes": k[2],
            "metrics": {m: asdict(s) for m, s in v.items()},
        }
        for k, v in sorted(table.items())
    ]
    document = {
        "meta": meta,
        "headline": lines,
        "ratios": ratios(lines),
        "summary": summary,
        "records": [asdict(r) for r in records],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
