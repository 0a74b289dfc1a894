"""How fast is the bare network, per variant, batch size and allocator?

Prints images/s and median latency for batch sizes 1..16 at the model's input
size for: eager, scripted, scripted+frozen (what ``model.load`` returns),
+optimize_for_inference, and channels-last; with the default allocator and
with jemalloc / tcmalloc preloaded (each allocator in its own process). Also
GFLOPs per image (torch.utils.flop_counter), the fp32 matmul peak measured in
the same process, the fraction of it each variant reaches, and the overhead of
``Segmenter.predict`` over the bare forward at batch 1.

    python benchmarks/model_speed.py [--model PATH] [--batches 1 2 4 8 16] [--out FILE]

``--compare`` instead puts chanseg's formats and precisions beside ONNX Runtime and
OpenVINO (``benchmarks/variants.py``; the ``peers`` extra), each in its own process,
with the fp32 and bf16 matmul peaks, argmax agreement with the eager fp32 network
and held-out mIoU (64 synthetic images of seed 2) per variant:

    python benchmarks/model_speed.py --compare [--batches 1 4 8] [--out benchmarks/results/model_compare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from testbed.allocators import ALLOCATORS, find_library

VARIANTS = ["eager", "scripted", "frozen", "frozen+ofi", "frozen+channels_last", "load()"]


def timed(fn, min_runs: int, min_seconds: float) -> float:
    """Median seconds of fn() over at least min_runs runs and min_seconds."""
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(n: int = 2048, dtype=None) -> float:
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / timed(lambda: a @ b, 10, 1.0) / 1e9


def build_variant(name: str, artifact_path: str | None):
    import torch

    import model
    from model.export import build_network, read_artifact
    from model.pretrained import default_artifact

    artifact = read_artifact(artifact_path) if artifact_path else default_artifact()
    if name == "eager":
        net = build_network(artifact.config, artifact.module.state_dict())
        return net, artifact.config, False
    if name == "scripted":
        return artifact.module.eval(), artifact.config, False
    if name == "load()":  # exactly what model.load() returns on CPU
        seg = model.load(artifact_path, device="cpu")
        return seg.module, artifact.config, seg.memory_format == torch.channels_last
    frozen = torch.jit.freeze(artifact.module.eval())
    if name == "frozen":
        return frozen, artifact.config, False
    if name == "frozen+ofi":
        return torch.jit.optimize_for_inference(frozen), artifact.config, False
    if name == "frozen+channels_last":
        net = torch.jit.freeze(artifact.module.eval().to(memory_format=torch.channels_last))
        return net, artifact.config, True
    raise ValueError(name)


def measure(args) -> dict:
    """One allocator's figures (runs inside the process that has it preloaded)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import model

    torch.manual_seed(0)
    peak = matmul_peak()
    results = {"matmul_peak_gflops": peak, "threads": torch.get_num_threads(), "variants": {}}
    for variant in VARIANTS:
        net, config, channels_last = build_variant(variant, args.model)
        h, w = config.input_size
        if "gflops_per_image" not in results:
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                build_variant("eager", args.model)[0](torch.randn(1, 3, h, w))
            results["gflops_per_image"] = counter.get_total_flops() / 1e9
        rows = {}
        for batch in args.batches:
            x = torch.randn(batch, 3, h, w)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                for _ in range(3):
                    net(x)
                seconds = timed(lambda: net(x), 3, args.seconds)  # noqa: B023
            ips = batch / seconds
            rows[batch] = {
                "latency_ms": seconds * 1000,
                "images_per_s": ips,
                "peak_fraction": ips * results["gflops_per_image"] / peak,
            }
            print(f"  {variant:<14} batch {batch:>2}: {seconds * 1000:8.1f} ms  {ips:6.2f} img/s", flush=True)
        results["variants"][variant] = rows

    seg = model.load(args.model, device="cpu")
    h, w = seg.config.input_size
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x = torch.randn(1, 3, h, w).contiguous(memory_format=seg.memory_format)
    with torch.inference_mode():
        for _ in range(3):
            seg.predict(image)
            seg.module(x)
        bare = timed(lambda: seg.module(x), 5, args.seconds)
    predict = timed(lambda: seg.predict(image), 5, args.seconds)
    results["predict_batch1_ms"] = predict * 1000
    results["forward_batch1_ms"] = bare * 1000
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="artifact (default: the bundled model)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timing per point")
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS))
    parser.add_argument("--out", default="benchmarks/results/model_speed.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--compare", action="store_true", help="chanseg's variants beside ONNX Runtime and OpenVINO"
    )
    parser.add_argument("--variants", nargs="+", help="with --compare: a subset (names as printed)")
    parser.add_argument("--count", type=int, default=64, help="with --compare: held-out images")
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_variant:
        print("RESULT " + json.dumps(measure_variant(args)), flush=True)
        return 0
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return 0
    if args.compare:
        return compare(args)

    report = {"allocators": {}}
    for alloc in args.allocators:
        env = dict(os.environ)
        if ALLOCATORS[alloc]:
            lib = find_library(ALLOCATORS[alloc])
            if lib is None:
                print(f"{alloc}: not installed (apt-get install libjemalloc2 libtcmalloc-minimal4); skipped")
                continue
            env["LD_PRELOAD"] = lib
        print(f"[{alloc}]", flush=True)
        cmd = [sys.executable, __file__, "--child", "--seconds", str(args.seconds), "--batches"]
        cmd += [str(b) for b in args.batches] + (["--model", args.model] if args.model else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            if line.startswith("RESULT "):
                report["allocators"][alloc] = json.loads(line[7:])
            else:
                print(line)

    print_table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {args.out}")
    return 0


def held_out(count: int):
    """(images as normalised (N, 3, H, W) float32, true masks) of the synthetic set of seed 2."""
    import numpy as np
    import torch

    from model.data import synthetic_sample
    from model.preprocess import normalize
    from model.pretrained import default_config

    config = default_config()
    samples = [synthetic_sample(2, i, tuple(config.input_size)) for i in range(count)]
    images = torch.from_numpy(np.stack([s.image for s in samples]))
    return normalize(images, config).numpy(), np.stack([s.mask for s in samples]), config


def _miou(pred, truth, classes: int) -> float:
    import torch

    from model.scores import confusion_matrix, scores

    confusion = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth.astype("int64")), classes)
    return float(scores(confusion, [str(c) for c in range(classes)])["miou"])


def measure_variant(args) -> dict:
    """One variant, in its own process: build time, speed per batch, agreement, mIoU."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import variants

    x, truth, config = held_out(args.count)
    if args.child_variant == "reference":
        run = variants.eager_reference()
        np.save(args.reference, np.concatenate([run(x[i : i + 8]).argmax(1) for i in range(0, len(x), 8)]))
        return {}
    if args.child_variant == "peaks":
        import torch

        return {"fp32_gflops": matmul_peak(), "bf16_gflops": matmul_peak(dtype=torch.bfloat16)}
    started = time.perf_counter()
    run = variants.build(args.child_variant)
    result = {"build_s": time.perf_counter() - started, "batches": {}}
    for batch in args.batches:
        xb = np.ascontiguousarray(x[:batch])
        for _ in range(3):
            run(xb)
        seconds = timed(lambda: run(xb), 5, args.seconds)  # noqa: B023
        result["batches"][batch] = {"latency_ms": seconds * 1000, "images_per_s": batch / seconds}
        print(f"  {args.child_variant:<36} batch {batch:>2}: {seconds * 1000:7.1f} ms", flush=True)
    pred = np.concatenate([run(np.ascontiguousarray(x[i : i + 8])).argmax(1) for i in range(0, len(x), 8)])
    result["agreement"] = float((pred == np.load(args.reference)).mean())
    result["miou"] = _miou(pred.astype("uint8"), truth, config.num_classes)
    return result


def _child(args, name: str, reference: str, env) -> dict:
    cmd = [sys.executable, __file__, "--child-variant", name, "--reference", reference, "--count", str(args.count),
           "--seconds", str(args.seconds), "--batches", *map(str, args.batches)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
        print(line, flush=True)
    return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:300]}


def compare(args) -> int:
    """Every variant in its own process, with glibc malloc (OpenVINO crashed under tcmalloc here)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository
    from benchmarks.variants import VARIANTS

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    reference = str(Path(tempfile.mkdtemp()) / "reference.npy")
    _child(args, "reference", reference, env)
    report = {"peaks": _child(args, "peaks", reference, env), "count": args.count, "variants": {}}
    for name in args.variants or list(VARIANTS):
        print(f"[{name}]", flush=True)
        report["variants"][name] = _child(args, name, reference, env)
    print_compare(report, args.batches)
    out = (
        args.out
        if args.out != "benchmarks/results/model_speed.json"
        else "benchmarks/results/model_compare.json"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {out}")
    return 0


def print_compare(report: dict, batches) -> None:
    peaks = report["peaks"]
    print(
        f"\n## matmul peaks: fp32 {peaks['fp32_gflops']:.0f} GFLOP/s, bf16 {peaks['bf16_gflops']:.0f} GFLOP/s; "
        f"held-out: {report['count']} synthetic images of seed 2"
    )
    print(
        "| variant | b1 ms | " + " | ".join(f"b{b} img/s" for b in batches) + " | argmax agreement | mIoU |"
    )
    print("|---" * (len(batches) + 4) + "|")
    for name, r in report["variants"].items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} |")
            continue
        rows = r["batches"]
        cells = " | ".join(
            f"{rows[str(b)]['images_per_s']:.1f}" if str(b) in rows else f"{rows[b]['images_per_s']:.1f}"
            for b in batches
        )
        first = rows.get(str(batches[0])) or rows[batches[0]]
        print(f"| {name} | {first['latency_ms']:.1f} | {cells} | {r['agreement']:.4f} | {r['miou']:.4f} |")


def print_table(report: dict) -> None:
    for alloc, res in report["allocators"].items():
        print(
            f"\n## {alloc}: matmul peak {res['matmul_peak_gflops']:.0f} GFLOP/s ({res['threads']} threads), "
            f"{res['gflops_per_image']:.2f} GFLOP per image"
        )
        batches = list(next(iter(res["variants"].values())))
        print("| variant | " + " | ".join(f"b{b} img/s" for b in batches) + " | b1 ms | b1 % of peak |")
        print("|---" * (len(batches) + 3) + "|")
        for variant, rows in res["variants"].items():
            b1 = rows[batches[0]]
            cells = " | ".join(f"{rows[b]['images_per_s']:.2f}" for b in batches)
            print(f"| {variant} | {cells} | {b1['latency_ms']:.1f} | {100 * b1['peak_fraction']:.0f}% |")
        eager = res["variants"]["eager"][batches[0]]["images_per_s"]
        frozen = res["variants"]["load()"][batches[0]]["images_per_s"]
        overhead = res["predict_batch1_ms"] / res["forward_batch1_ms"] - 1
        print(
            f"load() variant vs eager at batch 1: {frozen / eager:.2f}x; "
            f"Segmenter.predict {res['predict_batch1_ms']:.1f} ms vs bare forward "
            f"{res['forward_batch1_ms']:.1f} ms (+{100 * overhead:.1f}%)"
        )


if __name__ == "__main__":
    sys.exit(main())
