"""Training: AdamW, cross-entropy + Dice, flips, validation mIoU, resumable checkpoints.

``python -m model train`` is the command-line front end. Output directory:

- ``checkpoint.pt``: model, optimiser, step, best mIoU (resume with ``--resume``)
- ``best.safetensors`` + ``config.json``: the weights with the best validation mIoU
- ``model.pt``: the best weights exported as a TorchScript artifact at the end
"""

from __future__ import annotations

import json
import math
import pickle
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .artifact import written_atomically
from .data import FolderDataset, SyntheticShapes
from .devices import resolve_device
from .export import export_torchscript
from .network import ChannelAttentionUNet, ModelConfig
from .preprocess import normalize
from .scores import confusion_matrix, scores

__all__ = ["TrainOptions", "train", "evaluate", "make_datasets", "dice_loss", "SYNTHETIC"]

SYNTHETIC = "synthetic"
TRAIN_SEED, VAL_SEED = 0, 1  # synthetic seeds; held-out test images use seeds >= 2


@dataclass
class TrainOptions:
    """Settings of one training run (command-line flags of ``python -m model train``)."""

    data: str = SYNTHETIC
    out: str = "runs/default"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    crop: int = 0  # train on random crops of this side (0: whole images)
    val_size: int = 64  # synthetic validation images (folder data: 10% of the images)
    train_size: int = 0  # distinct synthetic training images (0: a fresh image for every sample)
    val_every: int = 250
    seed: int = 0
    device: str = "auto"  # model.devices.DEVICE_HELP
    num_workers: int = 0
    init: Optional[str] = None  # safetensors weights to start from
    resume: bool = False


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice loss averaged over classes. logits ``(N, C, H, W)``, target ``(N, H, W)``."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1.0 - ((2 * inter + eps) / (total + eps)).mean()


def make_datasets(opts: TrainOptions, config: ModelConfig) -> Tuple[Dataset, Dataset]:
    """Training and validation sets for ``opts.data`` (``synthetic`` or a folder)."""
    if opts.data == SYNTHETIC:
        size = tuple(config.input_size)
        return (
            SyntheticShapes(opts.train_size or opts.steps * opts.batch_size, seed=TRAIN_SEED, size=size),
            SyntheticShapes(opts.val_size, seed=VAL_SEED, size=size),
        )
    full = FolderDataset(opts.data, config.num_classes, size=tuple(config.input_size))
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(opts.seed)).tolist()
    n_val = max(1, len(full) // 10) if len(full) > 1 else 0
    val, tr = order[:n_val], order[n_val:] or order
    return Subset(full, tr), Subset(full, val or tr)


def _batches(dataset: Dataset, opts: TrainOptions, start_step: int) -> Iterator[Tuple[Tensor, Tensor]]:
    """Endless batches; the synthetic stream skips what earlier steps consumed."""
    generator = torch.Generator().manual_seed(opts.seed)
    epoch = 0
    while True:
        loader = DataLoader(
            dataset,
            batch_size=opts.batch_size,
            shuffle=not isinstance(dataset, SyntheticShapes),
            drop_last=len(dataset) >= opts.batch_size,
            num_workers=opts.num_workers,
            generator=generator,
        )
        if isinstance(dataset, SyntheticShapes) and epoch == 0 and start_step:
            skip = (start_step * opts.batch_size) % len(dataset)
            loader = DataLoader(
                Subset(dataset, range(skip, len(dataset))),
                batch_size=opts.batch_size,
                num_workers=opts.num_workers,
            )
        yield from loader
        epoch += 1


def _augment(images: Tensor, masks: Tensor, crop: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Random horizontal/vertical flips per sample, and a random crop per batch."""
    n = images.shape[0]
    flip_h = torch.rand(n, generator=generator) < 0.5
    flip_v = torch.rand(n, generator=generator) < 0.5
    images, masks = images.clone(), masks.clone()
    images[flip_h], masks[flip_h] = images[flip_h].flip(2), masks[flip_h].flip(2)
    images[flip_v], masks[flip_v] = images[flip_v].flip(1), masks[flip_v].flip(1)
    if crop:
        h, w = masks.shape[1:]
        top = int(torch.randint(0, h - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=generator))
        images = images[:, top : top + crop, left : left + crop]
        masks = masks[:, top : top + crop, left : left + crop]
    return images, masks


@torch.inference_mode()
def evaluate(
    net: torch.nn.Module, dataset: Dataset, config: ModelConfig, device: torch.device, batch_size: int = 16
) -> Dict[str, object]:
    """Per-class IoU, mIoU and pixel accuracy of ``net`` over ``dataset``."""
    was_training = net.training
    net.eval()
    confusion = torch.zeros(config.num_classes, config.num_classes, dtype=torch.int64)
    for images, masks in DataLoader(dataset, batch_size=batch_size):
        logits = net(normalize(images.to(device), config))
        confusion += confusion_matrix(logits.max(1).indices, masks.to(device), config.num_classes)
    net.train(was_training)
    return scores(confusion, config.class_names)


def _lr_factor(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup_steps:
        return (step + 1) / opts.warmup_steps
    progress = (step - opts.warmup_steps) / max(1, opts.steps - opts.warmup_steps)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    opts: TrainOptions,
    config: ModelConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> Dict[str, object]:
    """Train per ``opts``; returns a summary (steps, losses, best mIoU, paths, seconds)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)

    state = None
    if opts.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"{ckpt_path}: no checkpoint to resume from")
        try:  # tensors and plain values only: unpickling anything else could run its code
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"{ckpt_path}: not a chanseg checkpoint: it holds more than tensors and plain values ({first})"
            ) from None
        config = ModelConfig.from_dict(state["config"])
    config = config or ModelConfig()
    net = ChannelAttentionUNet(config).to(device)
    if opts.init and state is None:
        net.load_state_dict(load_file(opts.init), strict=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    step, best_miou, losses = 0, -1.0, []
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best_miou, losses = state["step"], state["best_miou"], state.get("losses", [])
        log(f"resumed from {ckpt_path} at step {step}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, opts), last_epoch=step - 1
    )

    train_set, val_set = make_datasets(opts, config)
    (out / "config.json").write_text(config.to_json())
    generator = torch.Generator().manual_seed(opts.seed * 1000003 + step)
    batches = _batches(train_set, opts, step)
    started, window = time.perf_counter(), []
    net.train()
    last_scores: Dict[str, object] = {}
    while step < opts.steps:
        images, masks = _augment(*next(batches), crop=opts.crop, generator=generator)
        logits = net(normalize(images.to(device), config))
        masks = masks.to(device)
        loss = F.cross_entropy(logits, masks) + dice_loss(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append((step, loss.item()))
        window.append(losses[-1][1])
        if step % 10 == 0 or step == opts.steps:
            mean_loss = sum(window) / len(window)
            window = []
            rate = step / max(1e-9, time.perf_counter() - started) if state is None else 0.0
            log(
                f"step {step}/{opts.steps} loss {mean_loss:.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e}"
                + (f" {rate:.2f} steps/s" if rate else "")
                + (f" val mIoU {last_scores['miou']:.4f}" if last_scores else "")
            )
        if step % opts.val_every == 0 or step == opts.steps:
            last_scores = evaluate(net, val_set, config, device, opts.batch_size)
            log(
                f"step {step} validation mIoU {last_scores['miou']:.4f} pixel acc {last_scores['pixel_accuracy']:.4f}"
            )
            if last_scores["miou"] > best_miou:
                best_miou = float(last_scores["miou"])
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                    out / "best.safetensors",
                )
            with written_atomically(ckpt_path, ".tmp") as tmp:  # a run killed mid-save keeps the last one
                torch.save(
                    {
                        "model": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "best_miou": best_miou,
                        "losses": losses,
                        "config": config.to_dict(),
                        "options": asdict(opts),
                    },
                    tmp,
                )

    best = ChannelAttentionUNet(config)
    best.load_state_dict(load_file(out / "best.safetensors"))
    artifact = export_torchscript(best, out / "model.pt", config, extra_meta={"best_val_miou": best_miou})
    summary = {
        "steps": step,
        "best_val_miou": best_miou,
        "last_val": last_scores,
        "losses": losses,  # (step, loss) for every step
        "seconds": time.perf_counter() - started,
        "artifact": str(artifact),
        "weights": str(out / "best.safetensors"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
