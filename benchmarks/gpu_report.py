"""What a ``benchmarks/gpu_check.sh`` run measured, as one summary and the few files
the GPU machine returns.

``summary`` prints ``summary.txt`` from a results folder: the machine, each step's
status, every figure, and the figures that are missing with the reason (the
step's status and note). ``pack`` writes that summary, the figures' JSON tables and
one archive of the rest into the folder that comes back, within its limits
(``MAX_FILES`` files of at most ``MAX_BYTES`` each, plain names): a log that
would not fit is left out and named in the summary. Standard library only: it
runs with the image's ``python3`` before anything else is installed, and in a
second when the deadline is near.

    python -m benchmarks.gpu_report summary RESULTS
    python -m benchmarks.gpu_report pack RESULTS OUT
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import re
import statistics
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

MAX_FILES = 8
MAX_BYTES = 16 * 2**20
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# The tables that come back as files of their own: name in OUT -> how to read them.
TABLES = ("steps.json", "raw.json", "service.json", "auto_batch.json", "agreement.json", "package.json")
ARCHIVE = "results.tar.gz"
ARCHIVE_SKIP = ("cache", "compile-cache")  # models and compiled packages: rebuilt on demand, megabytes


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> List[dict]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        with contextlib.suppress(ValueError):  # a line cut by the step's timeout
            out.append(json.loads(line))
    return out


def plan(results: Path) -> Dict[str, str]:
    """The knobs gpu_check.sh ran with (``plan.env``)."""
    out = {}
    try:
        for line in (results / "plan.env").read_text().splitlines():
            key, _, value = line.partition("=")
            out[key] = value
    except OSError:
        pass
    return out


def steps(results: Path) -> List[dict]:
    """``steps.tsv`` as dicts: id, key, name, status, seconds, limit, log, note."""
    keys = ("id", "key", "name", "status", "seconds", "limit", "log", "note")
    try:
        lines = (results / "steps.tsv").read_text().splitlines()
    except OSError:
        return []
    return [dict(zip(keys, line.split("\t"))) for line in lines if line]


def tables(results: Path) -> Dict[str, object]:
    """The figures' JSON tables, by the name they come back under (None: not there)."""
    compile_status = results / "compile.status"
    return {
        "steps.json": steps(results),
        "raw.json": _jsonl(results / "raw.jsonl") or None,
        "service.json": _json(results / "service" / "serve.json"),
        "auto_batch.json": _json(results / "auto_batch.json"),
        "agreement.json": _json(results / "agreement.json"),
        "package.json": {
            "compile_status": compile_status.read_text().strip() if compile_status.is_file() else None,
            "compile": _json(results / "compile.json"),
            "speed": _jsonl(results / "package.jsonl"),
        },
    }


# --- the summary --------------------------------------------------------------------


def _rate(entry: dict) -> str:
    if "images_per_s" in entry:
        return (
            f"{entry['images_per_s']:.0f}" if entry["images_per_s"] >= 100 else f"{entry['images_per_s']:.1f}"
        )
    return "OOM" if "memory" in entry.get("error", "") else "error"


def _speed_table(rows: List[dict]) -> List[str]:
    batches = sorted({int(b) for r in rows for b in r.get("per_batch", {})})
    head = f"  {'precision':9} {'images':10} {'format':11}" + "".join(f"{'b' + str(b):>8}" for b in batches)
    lines = [head + "   best (batch)   b1 ms"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['precision']:9} {r['images']:10} error: {r['error']}")
            continue
        per = {int(b): v for b, v in r["per_batch"].items()}
        cells = "".join(f"{_rate(per[b]) if b in per else '-':>8}" for b in batches)
        best = f"{_rate(r)} ({r['best_batch']})" if r.get("best_batch") else "-"
        b1 = f"{per[1]['ms']:.2f}" if 1 in per and "ms" in per[1] else "-"
        lines.append(f"  {r['precision']:9} {r['images']:10} {r['format']:11}{cells}   {best:>13} {b1:>7}")
    recipes = {(r["precision"], json.dumps(r.get("recipe"), sort_keys=True)) for r in rows if r.get("recipe")}
    for precision, recipe in sorted(recipes):
        shown = {k: v for k, v in json.loads(recipe).items() if k != "ms"}
        lines.append(f"  recipe {precision}: {shown}")
    return lines


def _smi(path: Path) -> Optional[str]:
    try:
        rows = list(csv.reader(path.read_text().splitlines()))[1:]
    except OSError:
        return None
    util, mem = [], []
    for r in rows:
        try:
            util.append(float(r[1].split()[0]))
            mem.append(float(r[3].split()[0]))
        except (IndexError, ValueError):
            continue
    if not util:
        return None
    return (
        f"  nvidia-smi ({len(util)} samples, 0.5 s apart): GPU busy median {statistics.median(util):.0f}%, "
        f"max {max(util):.0f}%; memory used max {max(mem):.0f} MiB"
    )


def _tests_line(results: Path, step: dict) -> Optional[str]:
    try:
        lines = (results / "logs" / Path(step["log"]).name).read_text().splitlines()
    except (OSError, KeyError):
        return None
    found = [line.strip("= ") for line in lines if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return found[-1] if found else None


def _missing(key: str, by_key: Dict[str, dict], what: str) -> str:
    step = by_key.get(key)
    if step is None:
        return f"{what}: its step never started (the run was cut before it)"
    why = step["status"] + (f": {step['note']}" if step["note"] else "")
    if step["status"] == "ok":
        why = "its step was ok but wrote no figure"
    return f"{what}: {why} (log: {Path(step['log']).name} in {ARCHIVE})"


def summary(results: Path, returned: Optional[List[Tuple[str, int]]] = None) -> str:
    """The text of summary.txt. ``returned``: the files that come back, with sizes."""
    knobs, found, env = plan(results), tables(results), _json(results / "environment.json") or {}
    run = steps(results)
    by_key = {s["key"]: s for s in run}
    out: List[str] = []
    gpu = env.get("gpu")
    machine = (
        f"{gpu['name']} ({gpu['memory_gib']} GiB, {gpu['sms']} SMs, compute {gpu['compute']})"
        if gpu
        else "no GPU"
    )
    out.append(f"chanseg GPU check on {machine}; device {knobs.get('DEVICE', '?')}")
    if env:
        out.append(
            f"torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), Python {env.get('python')},"
            f" {env.get('cpus')} CPUs ({env.get('host')}), Python.h {'present' if env.get('python_h') else 'MISSING'};"
            f" packages: {', '.join(f'{k} {v}' for k, v in env.get('packages', {}).items())}"
        )
    with contextlib.suppress(OSError):
        out += [
            line
            for line in (results / "progress.txt").read_text().splitlines()
            if line.startswith("gpu_check")
        ]
    out += ["", "Steps (status, seconds used of the step's limit):"]
    for s in run:
        note = f" - {s['note']}" if s["note"] else ""
        out.append(f"  {s['id']} {s['name']}: {s['status']} ({s['seconds']} s of {s['limit']} s){note}")
    missing: List[str] = []

    out += ["", "CUDA tests:"]
    line = _tests_line(results, by_key["cuda_tests"]) if "cuda_tests" in by_key else None
    out.append(f"  {line}" if line else "  -")
    if not line:
        missing.append(_missing("cuda_tests", by_key, "the CUDA tests' result"))

    out += ["", "Raw model, images/s by batch size (predict on decoded images, one forward pass per batch):"]
    raw = found["raw.json"] or []
    out += _speed_table(raw) if raw else ["  -"]
    done = {(r["precision"], r["images"]) for r in raw if "error" not in r}
    for spec in knobs.get("RAW_SPECS", "").split():
        precision, images, _ = spec.split(":")
        if (precision, images) not in done:
            errors = [
                r["error"]
                for r in raw
                if (r["precision"], r["images"]) == (precision, images) and "error" in r
            ]
            missing.append(
                f"raw {precision} {images}: {errors[0]}"
                if errors
                else _missing("raw_model", by_key, f"raw {precision} {images}")
            )

    out += ["", f"Service, TorchScript {knobs.get('SERVE_PRECISION', '?')} (python -m benchmarks run):"]
    service = found["service.json"]
    if service:
        try:
            text = (results / "service" / "serve.md").read_text().split("## As the README quotes it")[0]
            out += ["  " + line for line in text.strip().splitlines()]
        except OSError:
            out.append("  (serve.md missing; the rows are in service.json)")
        for row in service.get("rows", []):
            if not row.get("ok"):
                missing.append(
                    f"service {row['images']} {row['mode']} {row['load']:g}: no request completed in its window"
                    f" (statuses {row.get('statuses')})"
                )
        for name, info in service.get("servers", {}).items():
            out.append(
                f"  {name}: serving {info.get('startup_s')} s after its start; batching {info.get('batching')}"
            )
        smi = _smi(results / "smi.csv")
        if smi:
            out.append(smi)
    else:
        out.append("  -")
        missing.append(_missing("service", by_key, "the service's table"))

    out += ["", "Auto batch size (the server's measurement, limit " + knobs.get("AUTO_LIMIT", "?") + "):"]
    auto = found["auto_batch.json"] or {}
    for precision in knobs.get("AUTO_PRECISIONS", "").split():
        if "error" in auto.get(precision, {}):
            out.append(f"  {precision}: {auto[precision]['error']}")
            missing.append(f"the auto batch table at {precision}: {auto[precision]['error']}")
        elif precision in auto:
            a = auto[precision]
            rates = ", ".join(f"{b}: {_rate({'images_per_s': v})}" for b, v in a["images_per_s"].items())
            out.append(f"  {precision}: chooses {a['chooses']}; images/s by batch: {rates}")
        else:
            missing.append(_missing("auto_batch", by_key, f"the auto batch table at {precision}"))
    if not auto:
        out.append("  -")

    out += ["", "Masks against fp32 (fraction of pixels with fp32's class; mean, worst image):"]
    agreement = (found["agreement.json"] or {}).get("agreement", {})
    for precision in knobs.get("AGREEMENT_PRECISIONS", "").split():
        result = agreement.get(precision)
        if result is None:
            missing.append(_missing("agreement", by_key, f"{precision} against fp32"))
        elif "error" in result:
            out.append(f"  {precision}: {result['error']}")
            missing.append(f"{precision} against fp32: {result['error']}")
        else:
            sets = "; ".join(
                f"{k} {v['mean']:.5f}, {v['worst']:.5f} ({v['images']} images)" for k, v in result.items()
            )
            out.append(f"  {precision}: {sets}")
    if not agreement:
        out.append("  -")

    package = found["package.json"]
    out += ["", f"Compiled package (torch.export + AOTInductor, {knobs.get('PACKAGE_PRECISION', '?')}):"]
    compiled = package["compile"]
    if compiled:
        out.append(f"  compile: {json.dumps(compiled.get('results'))}")
    speed = [r for r in package["speed"] if r.get("format") == "package"]
    if speed:
        out += _speed_table(speed)
        reference = {
            r["images"]: r for r in raw if r.get("precision") == speed[0]["precision"] and "per_batch" in r
        }
        for r in speed:
            ts = reference.get(r["images"])
            if ts:
                ratios = [
                    f"b{b} {v['images_per_s'] / ts['per_batch'][b]['images_per_s']:.2f}x"
                    for b, v in r["per_batch"].items()
                    if "images_per_s" in v and "images_per_s" in ts["per_batch"].get(b, {})
                ]
                out.append(
                    f"  against TorchScript {r['precision']} {r['images']} (raw model above): {', '.join(ratios)}"
                )
    else:
        out.append("  - (no package was measured: nothing here is a TorchScript run under another name)")
        missing.append(_missing("package", by_key, "the compiled package's speed"))

    out += ["", "Missing figures:"]
    out += [f"  - {m}" for m in missing] or ["  none"]
    if returned is not None:
        shown = ", ".join(f"{n} ({size / 1024:.1f} KiB)" for n, size in returned)
        out += ["", f"Returned (from $OUT): summary.txt (this file), {shown}"]
    return "\n".join(out) + "\n"


# --- what comes back ----------------------------------------------------------------


def _archive(results: Path, path: Path, limit: int) -> List[str]:
    """Everything in ``results`` but the caches into a tar.gz under ``limit`` bytes,
    leaving out the largest files until it fits. Returns what was left out."""
    files = sorted(
        (
            p
            for p in results.rglob("*")
            if p.is_file() and p.relative_to(results).parts[0] not in ARCHIVE_SKIP
        ),
        key=lambda p: p.stat().st_size,
    )
    left_out: List[str] = []
    while True:
        with tarfile.open(path, "w:gz") as tar:
            for p in files:
                tar.add(p, arcname=str(Path("results") / p.relative_to(results)))
        if path.stat().st_size <= limit or not files:
            return left_out
        biggest = files.pop()
        left_out.append(f"{biggest.relative_to(results)} ({biggest.stat().st_size / 2**20:.1f} MiB)")


def pack(results: Path, out: Path) -> List[Tuple[str, int]]:
    """summary.txt, the tables and the archive into ``out``; returns (name, bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    written: List[Tuple[str, int]] = []
    for name, value in tables(results).items():
        if value is None:
            continue
        data = json.dumps(value, indent=1).encode()
        if len(data) > MAX_BYTES:  # never in practice: the archive still holds the source
            continue
        (out / name).write_bytes(data)
        written.append((name, len(data)))
    left_out = _archive(results, out / ARCHIVE, MAX_BYTES)
    written.append((ARCHIVE, (out / ARCHIVE).stat().st_size))
    text = summary(results, written)
    if left_out:
        text += f"Left out of {ARCHIVE} to fit {MAX_BYTES // 2**20} MiB: {', '.join(left_out)}\n"
    (out / "summary.txt").write_text(text)
    assert len(written) + 1 <= MAX_FILES and all(NAME.match(n) for n, _ in written)
    return [("summary.txt", len(text.encode())), *written]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("summary").add_argument("results", type=Path)
    p = sub.add_parser("pack")
    p.add_argument("results", type=Path)
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "summary":
        sys.stdout.write(summary(args.results))
        return 0
    for name, size in pack(args.results, args.out):
        print(f"{name}: {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
