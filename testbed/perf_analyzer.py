"""Triton's ``perf_analyzer``, the load tester Triton users already run: installed from PyPI
(the binary ships in the ``tritonclient`` 2.41 wheel for Linux x86-64; later wheels dropped
it) beside ``libcudart.so.12`` from the ``nvidia-cuda-runtime-cu12`` wheel (it links the CUDA
runtime even for HTTP and gRPC; no GPU is needed), and driven against a chanseg server.

``python -m testbed.perf_analyzer install`` (``make install`` runs it) fetches both wheels
(pinned, hash-checked) and unpacks them into ``.venv/perf_analyzer``; it also needs
Debian's ``libb64-0d`` (``apt-get install libb64-0d``; ``.ci/run`` installs it).
:func:`run` is one measurement: a concurrency, a protocol, an image, its figures parsed
from perf_analyzer's CSV report.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

__all__ = ["WHEELS", "HOME", "binary", "environment", "install", "input_data", "run"]

# The wheels, pinned with their sha256 (PyPI's).
WHEELS = {
    "tritonclient==2.41.0": "cf4ed5df836fa99937678a9fd852f86ba05c7b83656dd0a540e20afdb9ab4629",
    "nvidia-cuda-runtime-cu12==12.9.79": "25bba2dfb01d48a9b59ca474a1ac43c6ebf7011f1b0b8cc44f54eb6ac48a96c3",
}
HOME = Path(sys.prefix) / "perf_analyzer"  # inside the virtual environment: `make clean` removes it


def binary(home: Path = HOME) -> Optional[Path]:
    """The installed perf_analyzer, or None."""
    found = sorted(home.glob("tritonclient-*.data/data/bin/perf_analyzer"))
    return found[0] if found else None


def environment(home: Path = HOME) -> Dict[str, str]:
    """The environment perf_analyzer runs in: the wheel's CUDA runtime on the library path."""
    libs = [str(p.parent) for p in home.glob("nvidia/cuda_runtime/lib/libcudart.so.12")]
    path = os.pathsep.join(libs + [p for p in [os.environ.get("LD_LIBRARY_PATH", "")] if p])
    return {**os.environ, "LD_LIBRARY_PATH": path}


def install(home: Path = HOME) -> Path:
    """Download the pinned wheels (hash-checked) and unpack them into ``home``; the binary."""
    if binary(home) is not None:
        return binary(home)
    with tempfile.TemporaryDirectory() as tmp:
        pinned = Path(tmp, "requirements.txt")  # pip checks the hashes (as benchmarks/fetch_wheels.sh)
        pinned.write_text("".join(f"{spec} --hash=sha256:{digest}\n" for spec, digest in WHEELS.items()))
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--require-hashes",
             "--platform", "manylinux2014_x86_64", "-d", tmp, "-r", str(pinned)],
            check=True,
        )  # fmt: skip
        staging = Path(tempfile.mkdtemp(dir=home.parent, prefix=".perf_analyzer-"))
        try:
            for wheel in Path(tmp).glob("*.whl"):
                with zipfile.ZipFile(wheel) as archive:
                    members = [m for m in archive.namelist() if "perf_analyzer" in m or "libcudart.so" in m]
                    archive.extractall(staging, members)
            found = binary(staging)
            if found is None:
                raise RuntimeError("the tritonclient wheel holds no perf_analyzer")
            found.chmod(0o755)
            shutil.rmtree(home, ignore_errors=True)
            staging.rename(home)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return binary(home)


def input_data(path: Path, image: np.ndarray) -> Path:
    """perf_analyzer's ``--input-data`` file: one ``IMAGE`` (an (H, W, 3) uint8 array). The
    other input, ``IMAGE_BYTES``, is optional and left out, so it is not sent."""
    h, w, _ = image.shape
    doc = {"data": [{"IMAGE": {"content": image.ravel().tolist(), "shape": [h, w, 3]}}]}
    path.write_text(json.dumps(doc))
    return path


def run(
    url: str,
    model: str,
    data: Path,
    concurrency: int,
    protocol: str = "http",
    headers: Optional[Dict[str, str]] = None,
    window_ms: int = 3000,
    stability_percent: int = 10,
    timeout_s: float = 180,
    home: Path = HOME,
) -> Dict[str, float]:
    """One perf_analyzer measurement at ``concurrency``; its CSV row as numbers
    (``Inferences/Second``, ``p50 latency`` in usec, ...), plus ``stdout``. ``stability_percent``:
    perf_analyzer measures until three windows agree within it (its default, 10)."""
    exe = binary(home)
    if exe is None:
        raise FileNotFoundError("perf_analyzer is not installed: python -m testbed.perf_analyzer install")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        command = [
            str(exe), "-m", model, "-u", url, "-i", protocol, "--input-data", str(data),
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(window_ms),
            "--percentile", "50", "-f", str(report), "--stability-percentage", str(stability_percent),
            "--max-trials", "10",
        ]  # fmt: skip
        for key, value in (headers or {}).items():
            command += ["-H", f"{key}:{value}"]
        done = subprocess.run(
            command, env=environment(home), capture_output=True, text=True, timeout=timeout_s
        )
        if done.returncode != 0 or not report.exists():
            raise RuntimeError(
                f"perf_analyzer exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        rows: List[dict] = list(csv.DictReader(report.open()))
    figures: Dict = {k: float(v) for k, v in rows[0].items() if _number(v)}
    figures["stdout"] = done.stdout
    return figures


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.perf_analyzer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=["install", "where"])
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install())
    else:
        found = binary()
        print(found if found else "not installed")
        sys.exit(0 if found else 1)


if __name__ == "__main__":
    main()
