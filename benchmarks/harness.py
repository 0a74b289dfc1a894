"""``python -m benchmarks run``: every scenario, one machine, one run.

Scenarios, each a fresh process with the same allocator, driven by the same
client (``benchmarks.loadgen``) with the same images:

- raw ceiling: ``Segmenter.predict`` on decoded images at its best batch size,
  no HTTP; measured before and after the servers, the mean is the reference
- chanseg with its default batching, and with ``MAX_BATCH_SIZE=1``
- naive: FastAPI with the model inside the request handler
- litserve: LitServe with its own batching, at the
  batch size chanseg's auto measurement chose (``bench`` extra; skipped with a
  note when not installed)

Every server and the ceiling run the same file: ``--model``, or the one chanseg
loads with its settings (for the bundled model, its compiled package for this
machine when there is one; the ceiling reports it, ``model`` in the JSON).

Image sets: 256x256 PNGs (concurrency sweep), 1024x1024 JPEGs and 12 Mpx photos (fewer
levels); open-loop Poisson rates for chanseg. Every row also says where the CPU went per
image: each server's processes by thread role (``benchmarks.cpu``) and the load
generator's. Writes JSON, CSV, a PNG plot (where matplotlib is installed) and Markdown (the tables, the CPU split
at c16 against the ceiling's: ``cpu_table``, the serving targets: ``targets``, and
the run as the README quotes it: ``readme_tables``), and prints the tables and targets.

    python -m benchmarks run [--quick] [--scenarios chanseg naive ...] [--out DIR/NAME]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.util
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import httpx

from benchmarks.loadgen import measure, run
from benchmarks.servers import SCENARIOS, raw_ceiling, running
from model.hardware import available_cpus, host_description
from service.settings import Settings
from testbed.allocators import ALLOCATORS, find_library
from testbed.images import IMAGE_SETS

CSV_FIELDS = [
    "scenario", "images", "mode", "load", "status", "images_per_s", "pct_of_ceiling",
    "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "ok", "requests", "rejected", "errors",
    "rejected_p99_ms", "server_queue_ms", "server_inference_ms_per_batch", "server_batch_size",
    "client_cpu_ms_per_request", "server_cpu_ms_per_image", "server_host_ms_per_image",
]  # fmt: skip


def _row(scenario: str, images: str, m) -> dict:
    server = m.server or {}
    return {
        "scenario": scenario,
        "images": images,
        "mode": m.mode,
        "load": m.load,
        "status": m.status,
        "images_per_s": m.images_per_s,
        "p50_ms": m.p50_ms,
        "p90_ms": m.p90_ms,
        "p95_ms": m.p95_ms,
        "p99_ms": m.p99_ms,
        "mean_ms": m.mean_ms,
        "ok": m.ok,
        "requests": m.requests,
        "rejected": m.requests - m.ok - m.errors,
        "errors": m.errors,
        "rejected_p99_ms": m.rejected_p99_ms,
        "server_queue_ms": server.get("queue_ms"),
        "server_inference_ms_per_batch": server.get("inference_ms_per_batch"),
        "server_batch_size": server.get("batch_size"),
        "client_cpu_ms_per_request": m.client_cpu_ms_per_request,
        "server_cpu_ms_per_image": (m.server_cpu or {}).get("total"),  # the CSV's column
        "server_host_ms_per_image": host_ms(m.server_cpu),
        "server_cpu": m.server_cpu,  # by thread role (benchmarks.cpu)
        "statuses": m.statuses,
        "windows": len(m.windows),
    }


def find_row(
    rows: List[dict], scenario: str, images: str, load: float, mode: str = "concurrency"
) -> Optional[dict]:
    """The run's row for one scenario, image set and load; None when it has none."""
    for r in rows:
        if r["scenario"] == scenario and r["images"] == images and r["mode"] == mode and r["load"] == load:
            return r
    return None


def targets(report: dict, images: str = "png256") -> List[dict]:
    """The serving targets (docs/performance.md's table), as measured ratios with pass/fail."""
    rows, out = report["rows"], []
    ceiling = report["ceiling"][images]

    def add(name: str, value: Optional[float], goal: str, ok: Optional[bool]) -> None:
        out.append({"target": name, "value": value, "goal": goal, "met": ok})

    c1, c16, c64 = (find_row(rows, "chanseg", images, c) for c in (1, 16, 64))
    naive16, naive64 = find_row(rows, "naive", images, 16), find_row(rows, "naive", images, 64)
    lit16, lit64 = find_row(rows, "litserve", images, 16), find_row(rows, "litserve", images, 64)
    if c16:
        v = c16["images_per_s"] / ceiling["images_per_s"]
        add("c16 throughput / raw ceiling", v, ">= 0.90", v >= 0.90)
        v = c16["p99_ms"] / c16["p50_ms"]
        add("c16 p99 / p50", v, "<= 1.3", v <= 1.3)
    if c1 and ceiling.get("predict_batch1_ms"):
        v = c1["p50_ms"] - ceiling["predict_batch1_ms"]
        add("c1 p50 - batch-1 predict (ms)", v, "<= 10", v <= 10)
    if c16 and naive16:
        v = c16["images_per_s"] / naive16["images_per_s"]
        add("c16 throughput / naive", v, ">= 1.2", v >= 1.2)
    if c64 and naive64:
        v = c64["p99_ms"] / naive64["p99_ms"]
        add("c64 p99 / naive p99", v, "<= 0.2", v <= 0.2)
    if c64:
        timeout_ms = 1000 * report.get("request_timeout_s", 30.0)
        add(
            "c64 p99 (ms) under the deadline",
            c64["p99_ms"],
            f"< {timeout_ms:.0f}",
            c64["p99_ms"] < timeout_ms,
        )
    for c, lit in ((16, lit16), (64, lit64)):
        mine = c16 if c == 16 else c64
        if mine and lit:
            v = mine["images_per_s"] / lit["images_per_s"]
            add(f"c{c} throughput / LitServe", v, ">= 1.1", v >= 1.1)
            v = mine["p99_ms"] / lit["p99_ms"]
            add(f"c{c} p99 / LitServe p99", v, "<= 1.0", v <= 1.0)
    return out


CPU_LEVEL = 16  # the concurrency whose CPU split bench.md shows


def host_ms(cpu: Optional[dict]) -> Optional[float]:
    """The host's work per image: the server's CPU beside its inference threads (decoding,
    encoding, HTTP, the event loop), which a GPU does not take over. None for a server
    whose threads do not say which ran the model (``benchmarks.cpu``)."""
    if not cpu or cpu.get("inference", 0) <= 0:
        return None
    return cpu["total"] - cpu["inference"]


def cpu_budget(report: dict, row: dict) -> Optional[dict]:
    """Where a row's CPU went, ms per image: the server's by thread role and ``total``
    (``benchmarks.cpu``), the load generator's (``client``), and the ceiling's
    (``ceiling``: its CPUs' time over its images/s). Then the row's throughput as a
    fraction of the ceiling's (``of_ceiling``) taken apart: ``busy``, the fraction of
    the CPUs' time that the server and client used; for a server whose threads say
    which ran the model (chanseg), ``share``, inference's part of that time, and
    ``speed``, the ceiling's CPU per image over the served inference's; so that
    ``of_ceiling = busy x share x speed``. None without the split."""
    cpu = row.get("server_cpu")
    if not cpu or not report.get("cpus"):
        return None
    ceiling = report["ceiling"][row["images"]]["images_per_s"]
    client = row["client_cpu_ms_per_request"]
    used = cpu["total"] + client
    out = {**cpu, "client": client, "ceiling": report["cpus"] * 1000 / ceiling}
    if host_ms(cpu) is not None:
        out["host"] = host_ms(cpu)
    out["of_ceiling"] = row["images_per_s"] / ceiling
    out["busy"] = row["images_per_s"] * used / (1000 * report["cpus"])
    if cpu["inference"] > 0:
        out["share"] = cpu["inference"] / used
        out["speed"] = out["ceiling"] / cpu["inference"]
    return out


def _cpu_rows(report: dict) -> List[tuple]:
    """(row, its cpu_budget) for each closed-loop row at CPU_LEVEL that has one."""
    at_level = [r for r in report["rows"] if r["mode"] == "concurrency" and r["load"] == CPU_LEVEL]
    return [(r, b) for r in at_level if (b := cpu_budget(report, r)) is not None]


def cpu_table(report: dict) -> List[str]:
    """bench.md's lines on where the CPU went at CPU_LEVEL (:func:`cpu_budget`); none without the split."""
    budgets = _cpu_rows(report)
    if not budgets:
        return []
    keys = (
        "total",
        "host",
        "inference",
        "io",
        "main",
        "other",
        "client",
        "ceiling",
        "of_ceiling",
        "busy",
        "share",
        "speed",
    )
    lines = [
        f"\nCPU per image at c{CPU_LEVEL}, ms ({report['cpus']} CPUs; server: its processes by thread, "
        "benchmarks/cpu.py; ceiling: its CPUs' time per image, which for the JPEG sets includes predict "
        "resizing the full-size image). Of the ceiling = CPUs busy x inference's share of that time x "
        "its speed (the ceiling's CPU per image over the served inference's)",
        "| images | scenario | img/s | server | host | inference | I/O | main thread | other | client | ceiling "
        "| of ceiling | CPUs busy | inference share | speed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, b in budgets:
        cells = " | ".join(f"{b[k]:.2f}" if k in b else "-" for k in keys)
        lines.append(f"| {r['images']} | {r['scenario']} | {r['images_per_s']:.2f} | {cells} |")
    return lines


def write_csv(rows: List[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})


def table(report: dict) -> str:
    lines = []
    for images, ceiling in report["ceiling"].items():
        lines.append(
            f"\n{images}: raw ceiling {ceiling['images_per_s']:.2f} img/s (batch {ceiling['best_batch']}; "
            f"before {ceiling['before']:.2f}, after {ceiling['after']:.2f}); batch-1 predict "
            f"{ceiling['predict_batch1_ms']:.1f} ms"
        )
        lines.append("| scenario | load | img/s | % ceiling | p50 ms | p95 ms | p99 ms | non-200 | stable |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in report["rows"]:
            if r["images"] != images:
                continue
            load = f"c{r['load']:g}" if r["mode"] == "concurrency" else f"{r['load']:g}/s"
            other = {k: v for k, v in r["statuses"].items() if k != "200"}
            lines.append(
                f"| {r['scenario']} | {load} | {r['images_per_s']:.2f} | {r['pct_of_ceiling']:.0f}% "
                f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {other or '-'} | {r['status']} |"
            )
    lines += cpu_table(report)
    lines.append("\n| target (png256) | measured | goal | met |")
    lines.append("|---|---|---|---|")
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def readme_cell(row: dict) -> str:
    """How the docs quote a row: img/s (p99 ms), marked when unstable."""
    unstable = ", unstable" if row["status"] == "unstable" else ""
    return f"{row['images_per_s']:.1f} ({row['p99_ms']:.0f}{unstable})"


def readme_rate(row: dict) -> str:
    """How the docs quote an open-loop row."""
    unstable = " (unstable)" if row["status"] == "unstable" else ""
    return (
        f"{row['load']:g} req/s: {row['images_per_s']:.1f} img/s, "
        f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms{unstable}"
    )


def readme_tables(report: dict) -> str:
    """The run as the docs quote it (``tests/benchmarks/test_quoted_figures.py`` checks
    docs/performance.md and the README's headline table against it): per image set its
    raw ceiling and an img/s (p99) table of the closed-loop levels (the docs add a few
    words after each scenario's name), then the open-loop rows."""
    lines = []
    for images, ceiling in report["ceiling"].items():
        rows = [r for r in report["rows"] if r["images"] == images and r["mode"] == "concurrency"]
        levels = sorted({r["load"] for r in rows})
        lines += [
            f"\n{images} raw ceiling {ceiling['images_per_s']:.1f} img/s\n",
            f"| {images}: img/s (p99 ms) |" + "".join(f" c{c:g} |" for c in levels),
            "|---|" + "---|" * len(levels),
        ]
        for scenario in dict.fromkeys(r["scenario"] for r in rows):
            cells = {r["load"]: readme_cell(r) for r in rows if r["scenario"] == scenario}
            lines.append(f"| {scenario} | " + " | ".join(cells.get(c, "-") for c in levels) + " |")
    rates = [readme_rate(r) for r in report["rows"] if r["mode"] == "rate"]
    if rates:
        lines += ["", "Open loop (Poisson) on chanseg: " + "; ".join(rates)]
    budgets = [b for b in (readme_cpu(report, images) for images in report["ceiling"]) if b]
    if budgets:
        lines += ["", *budgets]
    return "\n".join(lines)


def readme_cpu(report: dict, images: str) -> Optional[str]:
    """How the docs quote where the CPU went at CPU_LEVEL on one image set."""
    found = {r["scenario"]: b for r, b in _cpu_rows(report) if r["images"] == images}
    mine = found.get("chanseg")
    if mine is None or "share" not in mine:
        return None
    others = "".join(f", {name} {b['total']:.1f}" for name, b in found.items() if name != "chanseg")
    return (
        f"{images} c{CPU_LEVEL}, CPU per image: chanseg {mine['total']:.1f} ms (inference "
        f"{mine['inference']:.1f}; host {mine['host']:.2f}: I/O {mine['io']:.2f}, event loop {mine['main']:.2f}, "
        f"other {mine['other']:.2f}){others}; load generator {mine['client']:.1f}. chanseg's "
        f"{mine['of_ceiling']:.2f} of the ceiling: the CPUs busy {mine['busy']:.2f} of the time, "
        f"inference's share of that {mine['share']:.2f}, and its speed against the ceiling's "
        f"forward passes ({mine['ceiling']:.1f} ms of CPU per image) {mine['speed']:.2f}"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--images", nargs="+", choices=list(IMAGE_SETS), default=list(IMAGE_SETS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--jpeg-concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--rates", type=float, nargs="*", default=[0.5, 0.9],
        help="open-loop Poisson rates for chanseg, as fractions of the raw ceiling",
    )  # fmt: skip
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--max-windows", type=int, default=6)
    parser.add_argument("--ceiling-seconds", type=float, default=4.0, help="per batch size")
    parser.add_argument(
        "--ceiling-batches", type=int, nargs="+", default=[1, 2, 4, 8],
        help="the raw ceiling's batch sizes (a GPU's best is larger: 1 8 32 64 128 256)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="c1/16/64, 2 s windows: a smoke run")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="tcmalloc")
    parser.add_argument("--model", help="artifact (default: the bundled model)")
    parser.add_argument("--litserve-batch", type=int, help="default: chanseg's auto choice")
    parser.add_argument(
        "--env", nargs="*", default=[], metavar="KEY=VALUE",
        help="extra settings for the chanseg scenarios, e.g. CHANSEG_DEVICE=cuda CHANSEG_PRECISION=fp16",
    )  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/bench", help="writes OUT.json, OUT.csv, OUT.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.jpeg_concurrency = [1, 16, 64], [16]
        args.window, args.warmup, args.max_windows, args.ceiling_seconds = 2.0, 1.0, 3, 2.0

    preload = find_library(ALLOCATORS[args.allocator]) if ALLOCATORS[args.allocator] else None
    if ALLOCATORS[args.allocator] and not preload:
        print(f"{args.allocator} is not installed: every process runs with glibc malloc")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = {name: IMAGE_SETS[name]() for name in args.images}
    levels = {name: args.concurrency if name == "png256" else args.jpeg_concurrency for name in IMAGE_SETS}
    report: Dict = {
        "machine": host_description(),
        "cpus": available_cpus(),
        "allocator": args.allocator if preload or not ALLOCATORS[args.allocator] else "glibc",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "method": {"window_s": args.window, "warmup_s": args.warmup, "max_windows": args.max_windows},
        "ceiling": {},
        "servers": {},
        "rows": [],
    }
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    report["settings"] = extra_env
    where = {
        "device": extra_env.get("CHANSEG_DEVICE", "auto"),
        "precision": extra_env.get("CHANSEG_PRECISION", "auto"),  # the server's default
        "format": extra_env.get("CHANSEG_MODEL_FORMAT", "auto"),  # the same artifact the server runs
    }

    def ceilings() -> Dict[str, dict]:
        return {
            n: raw_ceiling(
                imgs, args.model, preload, args.ceiling_seconds, batches=args.ceiling_batches, **where
            )
            for n, imgs in images.items()
        }

    print("[raw ceiling, before]", flush=True)
    before = ceilings()
    # The file chanseg serves with these settings (for the bundled model, its compiled
    # package for this machine when there is one): naive and LitServe serve it too.
    served = args.model or next(iter(before.values()))["path"]
    report["model"] = served

    auto_batch = None
    for name in args.scenarios:
        scenario = SCENARIOS[name]
        if scenario.kind == "chanseg" and extra_env:
            scenario = dataclasses.replace(scenario, env={**extra_env, **scenario.env})
        if scenario.kind == "litserve" and importlib.util.find_spec("litserve") is None:
            print("[litserve] skipped: not installed (pip install -e '.[bench]')", flush=True)
            report["servers"][name] = {"skipped": "litserve is not installed"}
            continue
        litserve_batch = args.litserve_batch or auto_batch or 1
        log_path = out.parent / f"{out.name}-{name}.log"
        sample = next(iter(images.values()))[0]
        facts: Dict[str, float] = {}
        model_path = args.model if scenario.kind == "chanseg" else served
        with running(scenario, sample, model_path, preload, litserve_batch, log_path, facts=facts) as url:
            pgid = int(facts["pgid"])
            info: Dict = {"label": scenario.label, "env": scenario.env, "startup_s": facts["startup_s"]}
            print(f"[{name}] serving {facts['startup_s']:.1f} s after its process started", flush=True)
            if scenario.kind == "chanseg":
                meta = httpx.get(url + "/v1/model", timeout=10).json()
                info["batching"] = meta["batching"]
                report["request_timeout_s"] = float(
                    scenario.env.get("CHANSEG_REQUEST_TIMEOUT_S", Settings().request_timeout_s)
                )
                if name == "chanseg":
                    auto_batch = meta["batching"]["max_batch_size"]
            if scenario.kind == "litserve":
                info["max_batch_size"], info["batch_timeout_ms"] = litserve_batch, 5.0
            report["servers"][name] = info
            for set_name, imgs in images.items():
                payloads = [scenario.payload(img) for img in imgs]
                loads = [("concurrency", c) for c in levels[set_name]]
                if name == "chanseg" and set_name == "png256":
                    reference = before[set_name]["images_per_s"]
                    loads += [("rate", round(f * reference, 1)) for f in args.rates]
                for mode, value in loads:
                    m = run(
                        measure(
                            url,
                            payloads,
                            path=scenario.path,
                            window_s=args.window,
                            warmup_s=args.warmup,
                            max_windows=args.max_windows,
                            poisson=mode == "rate",
                            server_pgid=pgid,
                            **{mode: value},
                        )
                    )
                    row = _row(name, set_name, m)
                    report["rows"].append(row)
                    unit = "" if mode == "concurrency" else "/s"
                    print(
                        f"[{name} {set_name} {mode} {value:g}{unit}] {m.images_per_s:.2f} img/s, "
                        f"p50 {m.p50_ms:.0f} p99 {m.p99_ms:.0f} ms, {m.statuses}, {m.status}",
                        flush=True,
                    )

    print("[raw ceiling, after]", flush=True)
    after = ceilings()
    for name in images:
        b, a = before[name], after[name]
        report["ceiling"][name] = {
            "images_per_s": statistics.mean([b["images_per_s"], a["images_per_s"]]),
            "before": b["images_per_s"],
            "after": a["images_per_s"],
            "best_batch": b["best_batch"],
            "predict_batch1_ms": statistics.mean([b["predict_batch1_ms"], a["predict_batch1_ms"]]),
            "per_batch_before": b["per_batch"],
            "per_batch_after": a["per_batch"],
        }
    for row in report["rows"]:
        row["pct_of_ceiling"] = 100 * row["images_per_s"] / report["ceiling"][row["images"]]["images_per_s"]
    report["targets"] = targets(report) if "png256" in images else []

    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    write_csv(report["rows"], out.with_suffix(".csv"))
    text = f"machine: {report['machine']}; allocator: {report['allocator']}; {report['date']}\n" + table(
        report
    )
    out.with_suffix(".md").write_text(f"{text}\n\n## As the README quotes it\n{readme_tables(report)}\n")
    print(text)
    if importlib.util.find_spec("matplotlib") is None:  # a bare GPU image: the tables are the figures
        print(f"\nwritten: {out}.json .csv .md (no plot: matplotlib is not installed)")
        return 0
    from benchmarks.plot import plot

    plot(report, out.with_suffix(".png"))
    print(f"\nwritten: {out}.json .csv .png .md")
    return 0
