"""Models whose inference leaves the host's work in view, for ``benchmarks.ab --model``.

On these CPUs the bundled model's forward pass takes ~200 ms of CPU per image, and the
host's work beside it (HTTP, decoding, encoding: ~2-3 ms) shares the cores with it. On a
GPU the forward pass leaves the CPU, and the host's work is the wall
(docs/performance.md, "Host work per image"). Two stand-ins, both with the bundled
model's classes and 256x256 input, random weights:

- ``small``: chanseg's network with widths 4 and 8: ~25 ms of CPU per image, masks
  of the shapes a network draws;
- ``null``: a 1x1 convolution, imported as a TorchScript model (``model.imported``):
  ~3 ms per image (the resize and normalisation around it, and the argmax), so the
  server is host-bound, as on a GPU host. Its masks are a per-pixel vote of the three
  colour channels: noisier than a network's, so their PNGs cost more to write.

    python -m benchmarks.hostbound small /tmp/small.pt
    python -m benchmarks.ab HEAD~1 --host 16 --model small   (made in a temporary folder)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import model
from model.imported import import_torchscript

__all__ = ["KINDS", "make"]

KINDS = ("small", "null")


def make(kind: str, out: str | Path) -> Path:
    """Write the ``kind`` artifact (``KINDS``) at ``out``; the same weights every time."""
    torch.manual_seed(0)
    config = model.ModelConfig()
    if kind == "small":
        small = model.ModelConfig(widths=(4, 8), class_names=config.class_names, input_size=config.input_size)
        model.export_torchscript(model.ChannelAttentionUNet(small), out, small)
    elif kind == "null":
        with tempfile.TemporaryDirectory(prefix="chanseg-null-") as tmp:
            scripted = Path(tmp) / "conv.ts"
            torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, config.num_classes, 1).eval()), scripted)
            import_torchscript(scripted, out, config.class_names, config.input_size, name="null")
    else:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out", help="the artifact to write")
    args = parser.parse_args(argv)
    print(make(args.kind, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
