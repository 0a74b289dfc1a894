"""benchmarks/gpu_check.sh's step runner: a step's status is what its command did, its
output is kept when it is cut, and nothing it started outlives it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real server, a real part or a compile: make test-all

ROOT = Path(__file__).resolve().parents[2]


def _run_steps(tmp_path: Path, body: str, deadline_s: int = 60) -> subprocess.CompletedProcess:
    """``body`` (bash: functions, ``export -f``, ``step`` calls) after sourcing the
    script's functions, with RESULTS in ``tmp_path``."""
    script = f"""
        export GPU_CHECK_LIB=1 DEADLINE_S={deadline_s} RESULTS={tmp_path}
        source benchmarks/gpu_check.sh
        start_run
        {body}
        exit $ANY_NOT_OK
    """
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _steps(tmp_path: Path) -> dict:
    """steps.tsv by key: (status, seconds, note)."""
    rows = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    return {row[1]: (row[3], int(row[4]), row[7]) for row in rows}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_a_failing_step_is_failed_and_the_next_one_runs(tmp_path):
    done = _run_steps(
        tmp_path,
        f"""
        failing() {{ echo partial > {tmp_path}/partial.txt; echo "the reason" > "$STEP_NOTE"; return 7; }}
        piped() {{ false | cat; }}  # pipefail: the status of the pipeline, not of its last command
        export -f failing piped
        step "fails" 10 failing
        step "fails in a pipe" 10 piped
        step "works" 10 true
        """,
    )
    steps = _steps(tmp_path)
    assert done.returncode == 1, done.stderr  # not every step was ok
    assert steps["failing"][0] == "FAILED" and steps["failing"][2] == "exit status 7: the reason"
    assert steps["piped"][0] == "FAILED" and steps["piped"][2] == "exit status 1"
    assert steps["true"][0] == "ok"
    assert (tmp_path / "partial.txt").read_text() == "partial\n"  # what a failed step wrote stays
    progress = (tmp_path / "progress.txt").read_text()
    assert "== fails: FAILED" in progress and "== works: ok" in progress


def test_only_ok_steps_exit_zero(tmp_path):
    done = _run_steps(tmp_path, 'step "works" 10 true; step "also" 10 echo hello')
    assert done.returncode == 0, done.stderr
    assert _steps(tmp_path) == {"true": ("ok", 0, ""), "echo": ("ok", 0, "")}
    assert (tmp_path / "logs" / "02-echo.log").read_text() == "hello\n"


def test_a_step_that_times_out_keeps_its_output_and_leaves_nothing_running(tmp_path):
    """The step prints, starts a child in its own group and one in a session of its
    own (as benchmarks/servers.py starts a server), then hangs: it is TIMED OUT, its
    output up to then is in its log, and both children are gone."""
    pids = tmp_path / "pids"
    done = _run_steps(
        tmp_path,
        f"""
        hangs() {{
          echo started
          python3 -c 'import sys, time; print("from python, unbuffered"); time.sleep(300)' &
          echo $! >> {pids}
          setsid sleep 300 &
          echo $! >> {pids}
          sleep 300
        }}
        export -f hangs
        step "hangs" 2 hangs
        """,
    )
    assert done.returncode == 1, done.stderr
    status, seconds, note = _steps(tmp_path)["hangs"]
    assert status == "TIMED OUT" and 2 <= seconds <= 8
    assert "cut at its 2 s limit" in note
    log = (tmp_path / "logs" / "01-hangs.log").read_text()
    assert log.startswith("started\n") and "from python, unbuffered" in log
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in children)
    assert "killed what it left running" in note and "sleep" in note  # the one in its own session


def test_an_ok_step_that_leaves_a_server_running_is_ok_and_the_server_is_killed(tmp_path):
    pidfile = tmp_path / "server.pid"
    done = _run_steps(
        tmp_path,
        f"""
        starts_a_server() {{ setsid sleep 300 & echo $! > {pidfile}; }}
        export -f starts_a_server
        step "server left" 10 starts_a_server
        """,
    )
    assert done.returncode == 0, done.stderr
    status, _, note = _steps(tmp_path)["starts_a_server"]
    assert status == "ok" and "killed what it left running" in note
    assert not _alive(int(pidfile.read_text()))


def test_steps_are_cut_to_the_deadline_and_skipped_near_it(tmp_path):
    # MIN_STEP_S is 15 s: with a 20 s deadline the first step gets 20 s at most, not 60,
    # and once it has used 6 s the next one is skipped, not started to be cut.
    done = _run_steps(
        tmp_path,
        """
        step "long" 60 sleep 6
        step "late" 10 true
        """,
        deadline_s=20,
    )
    assert done.returncode == 1, done.stderr
    steps = _steps(tmp_path)
    assert steps["sleep"][0] == "ok"
    assert steps["true"][0] == "skipped" and "the deadline" in steps["true"][2]
    assert "(at most 20 s;" in done.stdout


def test_a_paused_background_task_makes_no_progress_until_resumed(tmp_path):
    counter = tmp_path / "count"
    done = _run_steps(
        tmp_path,
        f"""
        counts() {{ while true; do echo x >> {counter}; sleep 0.1; done; }}
        export -f counts
        background counter counts
        sleep 1
        pause counter STOP stopped
        sleep 0.3
        wc -l < {counter} > {tmp_path}/at-stop
        sleep 1
        wc -l < {counter} > {tmp_path}/still
        pause counter CONT resumed
        sleep 1
        cleanup
        """,
    )
    assert done.returncode == 0, done.stderr
    at_stop, still = int((tmp_path / "at-stop").read_text()), int((tmp_path / "still").read_text())
    assert at_stop >= 3 and still == at_stop
    assert len(counter.read_text().split()) > still
    progress = (tmp_path / "progress.txt").read_text()
    assert "counter stopped at" in progress and "counter resumed at" in progress
    assert "killed at the end" in progress  # cleanup ended it
    assert not (tmp_path / "counter.status").exists()


def test_gpu_check_says_when_there_is_no_gpu(tmp_path):
    """Where a GPU is present the script runs; here (DEVICE=cuda, its default) it must
    stop at once with a clear message, not half-run on the CPU."""
    if shutil.which("nvidia-smi"):
        pytest.skip("an NVIDIA driver is present: run benchmarks/gpu_check.sh itself")
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "RESULTS": str(tmp_path / "results"), "HOME": os.environ.get("HOME", "/")},
    )  # fmt: skip
    assert done.returncode == 3 and "no NVIDIA GPU" in done.stderr
    assert not (tmp_path / "results").exists()


def test_servers_keep_the_inherited_pythonpath(monkeypatch):
    """On the GPU machine the service's packages are on PYTHONPATH (pip --target):
    the servers the benchmarks start must see them, after the source tree."""
    from testbed.processes import ROOT as SOURCE
    from testbed.processes import child_env as _env

    monkeypatch.setenv("PYTHONPATH", "/tmp/chanseg-site")
    assert _env(None, {})["PYTHONPATH"] == f"{SOURCE}{os.pathsep}/tmp/chanseg-site"
    monkeypatch.delenv("PYTHONPATH")
    assert _env(None, {})["PYTHONPATH"] == str(SOURCE)


def _results(tmp_path: Path) -> Path:
    """A run's results: environment ok, raw model cut with one precision done, the
    rest never started; a 20 MiB log that cannot be compressed."""
    results = tmp_path / "results"
    (results / "logs").mkdir(parents=True)
    (results / "plan.env").write_text(
        "DEVICE=cuda\nRAW_SPECS=fp32:png256:1,8 fp16:png256:1,8\nSERVE_PRECISION=fp16\n"
    )
    (results / "steps.tsv").write_text(
        f"01\tenvironment\tenvironment\tok\t4\t25\t{results}/logs/01-environment.log\t\n"
        f"02\traw_model\traw model (TorchScript)\tTIMED OUT\t110\t110\t{results}/logs/02-raw_model.log\t"
        "cut at its 110 s limit; its output so far is in the log\n"
    )
    line = {
        "precision": "fp32",
        "images": "png256",
        "format": "torchscript",
        "best_batch": 8,
        "images_per_s": 900.0,
        "per_batch": {"1": {"images_per_s": 200.0, "ms": 5.0}, "8": {"images_per_s": 900.0, "ms": 8.9}},
    }
    (results / "raw.jsonl").write_text(json.dumps(line) + '\n{"precision": "fp16", "ima')  # the cut line
    (results / "logs" / "02-raw_model.log").write_bytes(os.urandom(20 * 2**20))
    (results / "cache").mkdir()
    (results / "cache" / "default.pt").write_bytes(b"x" * 1000)
    return results


def test_pack_returns_the_figures_within_the_limits_and_says_what_is_missing(tmp_path):
    from benchmarks import gpu_report

    out = tmp_path / "out"
    returned = gpu_report.pack(_results(tmp_path), out)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(name for name, _ in returned)
    assert len(files) <= 8 and "summary.txt" in files and "results.tar.gz" in files
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)
    assert json.loads((out / "raw.json").read_text())[0]["images_per_s"] == 900.0  # the finished line only
    summary = (out / "summary.txt").read_text()
    assert "02 raw model (TorchScript): TIMED OUT (110 s of 110 s)" in summary
    assert "raw fp16 png256: TIMED OUT: cut at its 110 s limit" in summary  # missing, and why
    assert "raw fp32 png256" not in summary.split("Missing figures:")[1]
    assert "the service's table: its step never started" in summary
    assert "logs/02-raw_model.log (20.0 MiB)" in summary  # left out of the archive, and said so
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "results/steps.tsv" in names and "results/logs/02-raw_model.log" not in names
    assert not any("cache" in n for n in names)


@pytest.mark.parametrize(
    "compile_status, reason",
    [
        (None, "exit status 4: the compile did not finish in time"),
        ("1", "exit status 5: the compile failed with status 1"),
    ],
)
def test_the_package_step_says_when_there_is_no_package(tmp_path, compile_status, reason):
    """No package, no figure under its name: the step fails and says why; nothing is
    measured in its place (a TorchScript run would write package.jsonl)."""
    if compile_status is not None:
        (tmp_path / "compile.status").write_text(compile_status + "\n")
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "bg-compile.log").write_text("Traceback: no C++ compiler\n")
    done = _run_steps(tmp_path, 'step "compiled package" 20 package')
    assert done.returncode == 1, done.stderr
    status, _, note = _steps(tmp_path)["package"]
    assert status == "FAILED" and note.startswith(reason)
    assert not (tmp_path / "package.jsonl").exists()
