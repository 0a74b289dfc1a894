"""The harness end to end on the tiny model, and its peers serving the same masks."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.cpu import ROLES, group_cpu
from benchmarks.harness import cpu_budget, cpu_table, host_ms, readme_cpu
from benchmarks.servers import SCENARIOS, running
from testbed.images import make_images

ROOT = Path(__file__).resolve().parents[2]


def _mask(url: str, scenario, image: bytes) -> np.ndarray:
    payload = scenario.payload(image)
    r = httpx.post(
        url + scenario.path, content=payload.body, headers={"content-type": payload.content_type}, timeout=60
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content)))


@pytest.mark.slow
def test_every_server_answers_the_same_masks(tiny_artifact):
    """The comparison is fair only if all servers do the same work: same masks."""
    images = make_images(2, 256) + make_images(1, 300, "JPEG")
    masks = {}
    for name in ("chanseg", "naive", "litserve"):
        with running(SCENARIOS[name], images[0], model_path=tiny_artifact, litserve_batch=2) as url:
            masks[name] = [_mask(url, SCENARIOS[name], img) for img in images]
    for name in ("naive", "litserve"):
        for ours, theirs in zip(masks["chanseg"][:2], masks[name][:2]):
            np.testing.assert_array_equal(ours, theirs)
        # 300x300 JPEG: resized to 256 and back, naive with PIL's own nearest.
        assert masks[name][2].shape == (300, 300)
        assert (masks[name][2] == masks["chanseg"][2]).mean() > 0.98


@pytest.mark.slow
def test_a_stopped_server_leaves_nothing_in_tmp(tiny_package, tmp_path, monkeypatch):
    """torch's package loader, which the naive server uses, extracts the compiled
    library into the temporary directory and never removes it (9.6 MiB per run)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    image = make_images(1, 256)[0]
    with running(SCENARIOS["naive"], image, model_path=tiny_package) as url:
        assert _mask(url, SCENARIOS["naive"], image).shape == (256, 256)
        assert any(tmp_path.rglob("*.so")), "the loader extracted nothing: this test checks nothing"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_run_writes_json_csv_plot_and_table(tiny_artifact, tmp_path):
    out = tmp_path / "bench"
    cmd = [
        sys.executable, "-m", "benchmarks", "run", "--model", tiny_artifact,
        "--scenarios", "chanseg", "naive", "--images", "png256", "--concurrency", "1", "2",
        "--rates", "0.5", "--window", "0.5", "--warmup", "0.2", "--max-windows", "2",
        "--ceiling-seconds", "0.2", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "CHANSEG_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert all(0 < report["servers"][s]["startup_s"] < 120 for s in ("chanseg", "naive"))
    assert report["servers"]["chanseg"]["batching"]["max_batch_size_source"] == "measured"
    assert report["model"] == tiny_artifact  # what every server and the ceiling ran
    loads = [(r["scenario"], r["mode"], r["load"]) for r in report["rows"]]
    assert loads[:3] == [
        ("chanseg", "concurrency", 1),
        ("chanseg", "concurrency", 2),
        ("chanseg", "rate", loads[2][2]),
    ]
    assert loads[3:] == [("naive", "concurrency", 1), ("naive", "concurrency", 2)]
    assert all(r["ok"] > 0 and r["errors"] == 0 for r in report["rows"])
    # Where the CPU went: chanseg's named threads split it; the naive server's forward
    # passes run on its main thread, so it has no inference share; the parts add up.
    for r in report["rows"]:
        cpu = r["server_cpu"]
        assert cpu["total"] > 0 and r["server_cpu_ms_per_image"] == cpu["total"]
        assert sum(cpu[k] for k in ("inference", "io", "main", "other")) == pytest.approx(
            cpu["total"], rel=0.05
        )
        if r["scenario"] == "chanseg":
            assert cpu["inference"] > 0 and cpu["io"] > 0 and cpu["main"] > 0
        else:
            assert cpu["inference"] == cpu["io"] == 0 and cpu["main"] > 0
    ceiling = report["ceiling"]["png256"]
    assert ceiling["images_per_s"] > 0 and ceiling["best_batch"] in (1, 2, 4, 8)
    assert report["servers"]["chanseg"]["batching"]["max_batch_size_setting"] == "auto"
    assert [t["target"] for t in report["targets"]] == ["c1 p50 - batch-1 predict (ms)"]
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and float(rows[0]["images_per_s"]) > 0
    plot = Image.open(out.with_suffix(".png"))
    assert plot.format == "PNG" and plot.width > 500
    table = out.with_suffix(".md").read_text()
    assert "| chanseg | c1 |" in table and "| naive | c2 |" in table and "raw ceiling" in table
    quoted = table.split("## As the README quotes it", 1)[1]  # what test_quoted_figures reads
    assert "| png256: img/s (p99 ms) | c1 | c2 |" in quoted and "\n| naive | " in quoted
    assert "Open loop (Poisson) on chanseg: " in quoted
    assert "| chanseg |" in done.stdout  # printed too


def test_cpu_budget_splits_a_rows_cpu_against_the_ceiling():
    def row(scenario, images, inference, client=0.2):
        cpu = {"inference": inference, "io": 2.0 if inference else 0.0, "main": 1.5, "other": 0.3}
        cpu["total"] = sum(cpu.values())
        return {"scenario": scenario, "images": images, "mode": "concurrency", "load": 16, "images_per_s": 60.0,
                "client_cpu_ms_per_request": client, "server_cpu": cpu}  # fmt: skip

    report = {
        "cpus": 2, "ceiling": {"png256": {"images_per_s": 80.0}},
        "rows": [row("chanseg", "png256", 26.0), row("naive", "png256", 0.0), {**row("chanseg", "png256", 26.0), "load": 4}],
    }  # fmt: skip
    mine = cpu_budget(report, report["rows"][0])
    assert mine["ceiling"] == 25.0  # 2 CPUs busy for 1/80 s per image
    assert mine["of_ceiling"] == 0.75  # 60 of 80 img/s
    assert mine["busy"] == pytest.approx(60 * 30.0 / 2000)  # 29.8 ms server + 0.2 client per image
    assert mine["share"] == pytest.approx(26.0 / 30.0) and mine["speed"] == pytest.approx(25.0 / 26.0)
    assert mine["busy"] * mine["share"] * mine["speed"] == pytest.approx(mine["of_ceiling"])
    assert mine["host"] == pytest.approx(3.8)  # everything but inference: I/O, event loop, other
    theirs = cpu_budget(report, report["rows"][1])
    assert "share" not in theirs and theirs["total"] == pytest.approx(1.8)  # no named inference threads
    assert "host" not in theirs and host_ms(theirs) is None
    assert cpu_budget(report, {**report["rows"][0], "server_cpu": None}) is None
    assert readme_cpu(report, "png256") == (
        "png256 c16, CPU per image: chanseg 29.8 ms (inference 26.0; host 3.80: I/O 2.00, event loop 1.50, "
        "other 0.30), "
        "naive 1.8; load generator 0.2. chanseg's 0.75 of the ceiling: the CPUs busy 0.90 of the time, "
        "inference's share of that 0.87, and its speed against the ceiling's forward passes (25.0 ms of CPU "
        "per image) 0.96"
    )
    assert cpu_table(report)[3:] == [
        "| png256 | chanseg | 60.00 | 29.80 | 3.80 | 26.00 | 2.00 | 1.50 | 0.30 | 0.20 | 25.00 | 0.75 | 0.90 | 0.87 "
        "| 0.96 |",
        "| png256 | naive | 60.00 | 1.80 | - | 0.00 | 0.00 | 1.50 | 0.30 | 0.20 | 25.00 | 0.75 | 0.06 | - | - |",
    ]  # c16 only


PARENT = """
import subprocess, sys, threading, time
from service.threads import name_os_thread
CHILD = "import sys, time\\nend = time.thread_time() + 0.4\\nwhile time.thread_time() < end: pass\\nprint(flush=True)\\nsys.stdin.read()"
done, release = threading.Event(), threading.Event()
def spin():
    name_os_thread()
    end = time.thread_time() + 0.4
    while time.thread_time() < end:
        pass
    done.set()
    release.wait()  # alive while the test reads it: an exited thread counts as "other"
thread = threading.Thread(target=spin, name="chanseg-io_0")
thread.start()
child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
child.stdout.readline()
done.wait()
print("ready", flush=True)
sys.stdin.read()
release.set()
thread.join()
child.wait()
"""


def test_group_cpu_counts_every_process_of_the_group_by_thread_name():
    """0.4 s of CPU in a thread named chanseg-io_0, 0.4 s in a child process's main thread."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        cpu = group_cpu(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert 0.38 <= cpu["io"] <= 0.5, cpu
    assert cpu["main"] >= 0.38 and cpu["inference"] == 0, cpu  # each process's main thread
    assert cpu["total"] == pytest.approx(sum(cpu[k] for k in ROLES), abs=0.02), cpu
    assert group_cpu(os.getpgid(0))["io"] < 0.38  # another group: not the same threads


def test_usage_without_run_command():
    done = subprocess.run([sys.executable, "-m", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr


@pytest.mark.slow
def test_ceiling_makes_its_own_images(tiny_artifact):
    cmd = [sys.executable, "-m", "benchmarks.ceiling", "--model", tiny_artifact, "--images", "jpeg1024",
           "--batches", "1", "2", "--seconds", "0.1", "--device", "cpu", "--streams", "2"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["device"] == "cpu" and result["precision"] == "fp32"
    assert result["path"] == tiny_artifact and result["format"] == "torchscript"  # the file the servers get
    assert set(result["per_batch"]) == {"1", "2"} and result["predict_batch1_ms"] > 0
    # Also two predict calls side by side, as a saturated server's two streams; the ceiling is the better way.
    assert result["streams"] == 2 and set(result["per_batch_streams"]) == {"1", "2"}
    for batch, side_by_side in result["per_batch_streams"].items():
        assert 0 < side_by_side <= result["per_batch"][batch]["images_per_s"]
    assert result["images_per_s"] == max(b["images_per_s"] for b in result["per_batch"].values())


@pytest.mark.slow
def test_ab_runs_an_earlier_commit_beside_the_working_tree(tiny_artifact, capsys):
    from benchmarks import ab

    assert ab.main(["HEAD", "--requests", "4", "--model", tiny_artifact]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:2]] == ["before", "after"]
    medians = [float(line.split("median")[1].split()[0]) for line in lines[:2]]
    assert all(m > 0 for m in medians)
    assert "after - before:" in lines[2]
    worktrees = subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, check=True).stdout
    assert "chanseg-ab-" not in worktrees  # the checkout is gone again


@pytest.mark.slow
def test_floor_measures_a_bare_asgi_app_beside_chanseg(tiny_artifact, capsys):
    from benchmarks import floor

    assert (
        floor.main(["--requests", "100", "--rounds", "1", "--concurrency", "2", "--model", tiny_artifact])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2:4] for line in lines[:2]] == [["bare", "ASGI"], ["chanseg", "ms/request:"]]
    bare, ours = ({k: float(v) for k, v in (c.split() for c in line.split(": ")[1].split(";")[0].split(", "))}
                  for line in lines[:2])  # fmt: skip
    # Both servers' CPU was read: the bare one's event loop, chanseg's decoding.
    assert bare["main"] > 0 and ours["io"] > 0
    rates = [float(line.split("; ")[1].split()[0]) for line in lines[:2]]
    assert 0 < rates[0] < 3 * rates[1] and rates[1] < 3 * rates[0]  # the bare app was paced to chanseg's rate
    assert "chanseg's own" in lines[2]


def test_formats_prints_each_format_at_both_sizes(capsys):
    from benchmarks import formats

    assert formats.main(["--repeat", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        (size, fmt)
        for size in ("256x256", "2048x2048")
        for fmt in ("mask", "RLE", "confidence", "regions", "class")
    ]
    assert all(int(r[-2]) > 0 and float(r[-1]) > 0 for r in rows)


@pytest.mark.slow
def test_protocols_measures_predict_v2_http_and_grpc(tiny_artifact, capsys):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is in the dev extra")
    from benchmarks import protocols

    assert (
        protocols.main(
            ["--concurrency", "2", "--window", "0.5", "--max-windows", "1", "--model", tiny_artifact]
        )
        == 0
    )
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("predict", "2"), ("v2-http", "2"), ("v2-grpc", "2")]
    assert all(float(r[2]) > 0 and "not" not in " ".join(r) for r in rows)  # every request answered 200
