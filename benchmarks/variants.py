"""The ways to run the bundled network that ``model_speed.py --compare`` puts side by side.

Every variant is a function ``(N, 3, H, W) float32 normalised array -> (N, C, H, W)
logits``, made from the same weights:

- chanseg's own: the TorchScript artifact as ``model.load`` prepares it (frozen,
  channels-last) in fp32 and bf16, and the compiled package (torch.export +
  AOTInductor, :mod:`model.compiled`) in fp32 and bf16;
- the peers a user could move this network to: ONNX Runtime (an ONNX export of
  the same module, opset 17, dynamic batch) and OpenVINO with its f32 and bf16
  inference-precision hints (the ``peers`` extra: ``pip install -e '.[peers]'``).

Each runs in a process of its own: a peer's thread pool spinning beside torch's
distorts every figure (seen here).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Dict

import numpy as np

__all__ = ["VARIANTS", "build"]

Runner = Callable[[np.ndarray], np.ndarray]


def _network():
    from safetensors.torch import load_file

    from model.export import build_network
    from model.pretrained import default_config, default_weights

    return build_network(default_config(), load_file(str(default_weights()))), default_config()


def _chanseg(precision: str, format: str) -> Runner:
    import torch

    import model

    seg = model.load(None, device="cpu", precision=precision, format=format)
    if format == "package" and seg.format != "package":
        raise RuntimeError("no compiled package")

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).to(seg.dtype).contiguous(memory_format=seg.memory_format)
        with torch.inference_mode():
            return seg.module(t).float().numpy()

    return run


def _onnx_file(opset: int = 17) -> Path:
    import torch

    net, config = _network()
    h, w = config.input_size
    path = Path(tempfile.mkdtemp()) / "net.onnx"
    torch.onnx.export(
        net.eval(), (torch.randn(1, 3, h, w),), str(path), opset_version=opset, dynamo=False,
        input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )  # fmt: skip
    return path


def _onnxruntime() -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(_onnx_file()), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def _openvino(hint: str) -> Runner:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(_onnx_file())),
        "CPU",
        {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"},
    )
    return lambda x: compiled(x)[0]


VARIANTS: Dict[str, Callable[[], Runner]] = {
    "chanseg TorchScript fp32 (load())": lambda: _chanseg("fp32", "torchscript"),
    "chanseg TorchScript bf16": lambda: _chanseg("bf16", "torchscript"),
    "chanseg package fp32": lambda: _chanseg("fp32", "package"),
    "chanseg package bf16": lambda: _chanseg("bf16", "package"),
    "ONNX Runtime fp32": _onnxruntime,
    "OpenVINO f32": lambda: _openvino("f32"),
    "OpenVINO bf16 hint": lambda: _openvino("bf16"),
}


def build(name: str) -> Runner:
    return VARIANTS[name]()


def eager_reference() -> Runner:
    """The eager fp32 network: what agreement is measured against."""
    import torch

    net, _ = _network()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net.eval()(torch.from_numpy(x)).numpy()

    return run
