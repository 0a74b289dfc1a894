"""The ``chanseg`` command: every subcommand answers --help, predict takes files and
folders (a batch in memory at a time, a progress bar), serve runs the server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import model
from service.cli import MODEL_COMMANDS
from testbed.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
CHANSEG = Path(sys.executable).parent / "chanseg"

pytestmark = pytest.mark.skipif(
    not CHANSEG.exists(), reason="the console script is installed by pip install -e ."
)


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHANSEG), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_command_has_help(capsys):
    top = run("--help")  # the console script itself, as installed
    assert top.returncode == 0
    assert run("predict", "--help").stdout.startswith("usage: chanseg predict")
    bad = run("bogus")
    assert bad.returncode == 2 and "unknown command 'bogus'" in bad.stderr
    assert run().returncode == 2
    from service.cli import main  # the rest in this process: a torch import per command is ~2 s

    bench = run(
        "bench", "--help"
    )  # python -m benchmarks run, a child process: service never imports benchmarks
    assert bench.returncode == 0 and bench.stdout.startswith("usage: python -m benchmarks run")
    for command in ("serve", *MODEL_COMMANDS):
        assert command in top.stdout
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0, command
        out = capsys.readouterr().out
        assert out.startswith("usage: "), (command, out[:200])


def test_predict_takes_files_and_folders(tiny_artifact, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(5):
        arrays[f"p{i}"] = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(arrays[f"p{i}"]).save(photos / f"p{i}.png")
    (photos / "notes.txt").write_text("not an image")
    single = tmp_path / "single.jpg"
    Image.fromarray(arrays["p0"]).save(single)
    out = tmp_path / "out"
    done = run(
        "predict",
        "--model",
        tiny_artifact,
        "--device",
        "cpu",
        "--batch-size",
        "2",
        str(photos),
        str(single),
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        [f"p{i}.{kind}.png" for i in range(5) for kind in ("mask", "overlay")]
        + ["single.mask.png", "single.overlay.png"]
    )
    assert "6/6 images" in done.stderr  # the progress bar's last state
    seg = model.load(tiny_artifact, device="cpu")
    for name, array in arrays.items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}.mask.png")), seg.predict(array))
    missing = run("predict", "--model", tiny_artifact, str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr


@pytest.mark.slow
def test_serve_runs_the_server(tiny_artifact, tmp_path):
    """With the key from a file: ``--api-key KEY`` would show it to every user in the process list."""
    port = free_port()
    (tmp_path / "key").write_text("\nfile-key\n")  # the first non-empty line
    (tmp_path / "empty").write_text("\n \n")
    command = [str(CHANSEG), "serve", "--model", tiny_artifact, "--port", str(port), "--device", "cpu"]
    refused = run(*command[1:], "--api-key", "visible-key")
    assert refused.returncode == 2 and "--api-key-file" in refused.stderr
    empty = run(*command[1:], "--api-key-file", str(tmp_path / "empty"))  # no key is not "no auth"
    assert empty.returncode == 2 and "holds no key" in empty.stderr
    proc = subprocess.Popen(
        [*command, "--max-batch-size", "2", "--api-key-file", str(tmp_path / "key")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline, ready = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        info = httpx.get(f"http://127.0.0.1:{port}/v1/model", headers={"x-api-key": "file-key"}).json()
        unauthorized = httpx.get(f"http://127.0.0.1:{port}/v1/model")
        listed = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert ready is not None and ready.status_code == 200
    assert info["name"] == "tiny" and info["batching"]["max_batch_size"] == 2
    assert unauthorized.status_code == 401 and "file-key" not in listed
    assert code == 0  # SIGTERM drains and exits cleanly


@pytest.mark.slow
def test_python_m_service_help_prints_help_and_starts_nothing():
    done = subprocess.run(
        [sys.executable, "-m", "service", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (
        done.returncode == 0
        and done.stdout.startswith("usage: python -m service")
        and "CHANSEG_" in done.stdout
    )
    bad = subprocess.run(
        [sys.executable, "-m", "service", "--port", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
