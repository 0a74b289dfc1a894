"""Training smoke tests on tiny configurations (a few seconds on 2 cores)."""

from __future__ import annotations

import json

import pytest
import torch

import model
from model.__main__ import main
from model.network import ModelConfig
from model.train import TrainOptions, dice_loss, train
from tests.model.test_data import _folder

SMALL = ModelConfig(widths=(8, 16), input_size=(128, 128), name="smoke")


def test_thirty_steps_reduce_the_loss_by_30_percent(tmp_path):
    # Eight fixed synthetic images: a net that trains must fit them quickly.
    opts = TrainOptions(
        steps=30,
        batch_size=8,
        train_size=8,
        lr=1e-2,
        warmup_steps=1,
        val_size=4,
        val_every=30,
        out=str(tmp_path),
    )
    summary = train(opts, SMALL, log=lambda line: None)
    losses = [loss for _, loss in summary["losses"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 <= 0.7 * losses[0], losses
    artifact = model.read_artifact(summary["artifact"])
    assert artifact.config == SMALL and "best_val_miou" in artifact.meta


def test_resume_continues_the_step_count(tmp_path):
    opts = TrainOptions(steps=4, batch_size=2, crop=32, val_size=2, val_every=2, out=str(tmp_path))
    train(opts, SMALL, log=lambda line: None)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    logs = []
    opts.steps, opts.resume = 6, True
    summary = train(opts, log=logs.append)
    assert summary["steps"] == 6
    assert any("resumed" in line and "step 4" in line for line in logs)
    assert [s for s, _ in summary["losses"]] == [1, 2, 3, 4, 5, 6]


class _RunsOnLoad:
    """What a planted checkpoint could hold: unpickling it calls ``print`` (or anything)."""

    def __reduce__(self):
        return (print, ("code ran while the checkpoint was read",))


def test_resume_reads_tensors_and_plain_values_only(tmp_path, capsys):
    torch.save({"config": SMALL.to_dict(), "model": _RunsOnLoad()}, tmp_path / "checkpoint.pt")
    opts = TrainOptions(steps=2, out=str(tmp_path), resume=True)
    with pytest.raises(ValueError, match="not a chanseg checkpoint"):
        train(opts, log=lambda line: None)
    assert "code ran" not in capsys.readouterr().out


def test_folder_data_through_the_cli(tmp_path, capsys):
    root = _folder(tmp_path / "data", n=6, size=(32, 32))
    config = tmp_path / "config.json"
    config.write_text(ModelConfig(widths=(4, 8), input_size=(32, 32), name="folder").to_json())
    out = tmp_path / "run"
    code = main(["train", "--data", str(root), "--config", str(config), "--out", str(out), "--steps", "3",
                 "--batch-size", "2", "--val-every", "3"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and (out / "model.pt").is_file()
    assert main(["eval", "--model", str(out / "model.pt"), "--data", str(root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["iou"]) == {"background", "circle", "rectangle", "triangle"}
    assert 0 <= result["miou"] <= 1 and result["images"] == 6


def test_dice_loss_is_zero_for_perfect_and_high_for_wrong():
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target) < 1e-3
    assert dice_loss(-perfect, target) > 0.9
