"""Triton's ``config.pbtxt`` for a model of :mod:`service.triton_layout`.

``config.pbtxt`` is untrusted text: at most :data:`MAX_CONFIG_BYTES`, parsed by protobuf's
own text-format parser into Triton's ``ModelConfig`` (``tritonclient.grpc.model_config_pb2``,
from the grpc extra), and checked. What chanseg reads of it:

- ``name``: empty, or the folder's name (Triton's rule);
- ``platform`` / ``backend``: empty, ``pytorch_libtorch`` / ``pytorch``; any other is refused;
- ``default_model_filename``: the file in each version folder (default ``model.pt``);
- ``max_batch_size``: above 0, the largest batch the model runs (start-up caps the server's
  batch size to it; a later load of a model that runs fewer than the server forms is refused);
  0: the tensors' first dim is the batch, -1 (any) or 1 (batches of one);
- ``version_policy``: ``latest { num_versions: 1 }`` (the default: the highest version) or
  ``specific { versions: [N] }``; ``all``, ``num_versions`` above 1 and several versions are
  refused (chanseg serves one version of a model at a time);
- for a plain TorchScript file only (a chanseg artifact carries its own, and these are not
  read): the one ``input``, ``TYPE_FP32``, ``dims: [3, H, W]`` (or ``[H, W, 3]``: the module
  takes channels last, and is fed a permuted batch); the one ``output``, a float type,
  ``dims: [C, H, W]`` (C classes, at most 256: masks are uint8; H and W -1 or the input's);
  the output's ``label_filename`` (a file in the model's folder, one class name a line;
  default ``class_0``, ``class_1``, ...); and ``parameters`` ``mean`` and ``std`` (three
  comma-separated numbers each, default ImageNet's) and ``input_size`` (``H,W``, needed when
  the input's H or W is -1: chanseg resizes every image to one size), as string values.

Refused, since the model would not behave as its config says: ``ensemble_scheduling``,
``sequence_batching``, ``batch_input``, ``batch_output``, a decoupled
``model_transaction_policy``, and an input's or output's ``reshape``. Read and ignored
(chanseg's own settings do their work): ``instance_group`` (``DEVICE``,
``INFERENCE_STREAMS``), ``dynamic_batching`` (``MAX_BATCH_DELAY_MS``), ``optimization``,
``model_warmup`` (chanseg warms up every batch size it forms), ``response_cache``,
``runtime``, ``cc_model_filenames``, ``metric_tags``, ``model_operations``,
``model_repository_agents``, ``model_metrics``, the tensors' names, ``format`` and other
options, and every other ``parameters`` key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from model.artifact import ModelLoadError
from model.imported import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["TritonLayoutError", "read_config", "specific", "plain_name", "described", "CONFIG_FILE"]

CONFIG_FILE = "config.pbtxt"
MAX_CONFIG_BYTES = 1 << 20
MAX_LABELS_BYTES = 1 << 20
MAX_SIDE = 4096  # of the input size: a plain model is checked on a batch of two at that size
MAX_CLASSES = 256  # masks are uint8 class ids
_REFUSED = {
    "ensemble_scheduling": "an ensemble is a pipeline of models, not one chanseg can run",
    "sequence_batching": "chanseg has no stateful sequences",
    "batch_input": "chanseg feeds the model one image batch, nothing else",
    "batch_output": "chanseg reads one logits output",
}
_FLOATS = ("TYPE_FP32", "TYPE_FP16", "TYPE_BF16")


class TritonLayoutError(ModelLoadError):
    """A model folder of Triton's layout that chanseg cannot serve (the message says why)."""


def _model_config_class():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise TritonLayoutError(
            f"reading {CONFIG_FILE} needs Triton's model config definitions: install the grpc extra "
            f"(pip install 'chanseg[grpc]'): {exc}"
        ) from None
    return model_config_pb2


def read_config(root: Path, folder: Path, name: str):
    """``config.pbtxt`` parsed and checked; None without one."""
    path = folder / CONFIG_FILE
    if not path.exists():
        return None
    config = _model_config_class().ModelConfig()
    path = path.resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise TritonLayoutError(f"{name}/{CONFIG_FILE}: not a file in the model repository")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise TritonLayoutError(
            f"{name}/{CONFIG_FILE}: over {MAX_CONFIG_BYTES >> 20} MiB; a model config is a few kB"
        )
    from google.protobuf import text_format

    try:
        text_format.Parse(data.decode("utf-8"), config)
    except UnicodeDecodeError:
        raise TritonLayoutError(f"{name}/{CONFIG_FILE}: not UTF-8 text") from None
    except (text_format.ParseError, RecursionError, ValueError) as exc:
        raise TritonLayoutError(
            f"{name}/{CONFIG_FILE}: not a Triton model config: {str(exc)[:300]}"
        ) from None
    _check_config(config, name)
    return config


def _check_config(config, name: str) -> None:
    """What chanseg must refuse in any config (a plain model's tensors: :func:`_described`)."""
    where = f"{name}/{CONFIG_FILE}"
    if config.name and config.name != name:
        raise TritonLayoutError(
            f"{where}: name '{config.name[:100]}' is not the folder's, '{name}' (Triton's rule: they must be equal)"
        )
    if config.platform not in ("", "pytorch_libtorch") or config.backend not in ("", "pytorch"):
        what = config.platform or config.backend
        raise TritonLayoutError(
            f"{where}: platform/backend '{what[:100]}': chanseg serves TorchScript (pytorch_libtorch) models only"
        )
    present = {descriptor.name for descriptor, _ in config.ListFields()}
    for key, why in _REFUSED.items():
        if key in present:
            raise TritonLayoutError(f"{where}: {key} is not supported: {why}")
    if config.model_transaction_policy.decoupled:
        raise TritonLayoutError(
            f"{where}: a decoupled model is not supported: chanseg answers each request once"
        )
    if config.max_batch_size < 0:
        raise TritonLayoutError(f"{where}: max_batch_size must be 0 or more, got {config.max_batch_size}")
    specific(config, where)


def specific(config, where: str = "") -> Optional[int]:
    """The version a ``specific`` policy names, None for ``latest`` (or no policy); else refused."""
    if config is None or not config.HasField("version_policy"):
        return None
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    one = "chanseg serves one version of a model at a time"
    if kind == "all":
        raise TritonLayoutError(
            f"{where}: version_policy all is not supported: {one} (use latest or specific)"
        )
    if kind == "latest" and policy.latest.num_versions > 1:
        raise TritonLayoutError(
            f"{where}: version_policy latest {{ num_versions: {policy.latest.num_versions} }}: {one}, "
            "so num_versions must be 1"
        )
    if kind == "specific":
        if len(policy.specific.versions) != 1:
            raise TritonLayoutError(
                f"{where}: version_policy specific names {len(policy.specific.versions)} versions: {one}, "
                "so name exactly one"
            )
        return int(policy.specific.versions[0])
    return None


def plain_name(value: str, field: str, name: str) -> str:
    """``value`` when it names a file in the folder itself (no ``/``, not ``..``)."""
    if value and ("/" in value or "\\" in value or value in (".", "..") or "\0" in value or len(value) > 255):
        raise TritonLayoutError(f"{name}/{CONFIG_FILE}: {field} must be a file name in the model's folder")
    return value


# -- a plain TorchScript file: what config.pbtxt says about it ---------------------------------


def described(name: str, folder: Path, config) -> Dict[str, Any]:
    """The :func:`import_torchscript` arguments for a plain TorchScript version of model ``name``:
    class names, input size, mean, std, channels_last_input; and ``max_batch``."""
    where = f"{name}/{CONFIG_FILE}"
    if config is None:
        raise TritonLayoutError(
            f"{name}: a plain TorchScript model needs {CONFIG_FILE} (its input and output dims), as Triton's "
            "PyTorch backend does; or export it as a chanseg artifact (python -m model import)"
        )
    if len(config.input) != 1 or len(config.output) != 1:
        raise TritonLayoutError(
            f"{where}: {len(config.input)} inputs and {len(config.output)} outputs; chanseg serves a model with "
            "one image input and one logits output"
        )
    inp, out = config.input[0], config.output[0]
    for tensor in (inp, out):
        if tensor.HasField("reshape"):
            raise TritonLayoutError(f"{where}: {tensor.name[:64]} has a reshape; give the model's own dims")
    dtype = _type_name(inp.data_type)
    if dtype != "TYPE_FP32":
        raise TritonLayoutError(
            f"{where}: input data_type {dtype}; chanseg feeds TYPE_FP32 normalised pixels"
        )
    if _type_name(out.data_type) not in _FLOATS:
        raise TritonLayoutError(
            f"{where}: output data_type {_type_name(out.data_type)}; chanseg needs float logits"
        )
    batched = config.max_batch_size > 0
    in_dims, in_batch = _unbatched(list(inp.dims), batched, "input", where)
    out_dims, out_batch = _unbatched(list(out.dims), batched, "output", where)
    if len(in_dims) != 3 or len(out_dims) != 3:
        raise TritonLayoutError(
            f"{where}: input dims {list(inp.dims)} and output dims {list(out.dims)}; chanseg needs an image "
            "[3, H, W] (or [H, W, 3]) in and logits [C, H, W] out"
            + ("" if batched else ", after the batch dim (max_batch_size is 0)")
        )
    if in_dims[0] == 3:
        channels_last, spatial = False, in_dims[1:]
    elif in_dims[2] == 3:
        channels_last, spatial = True, in_dims[:2]
    else:
        raise TritonLayoutError(
            f"{where}: input dims {in_dims}: neither [3, H, W] nor [H, W, 3] (RGB images)"
        )
    parameters = config.parameters
    if -1 in spatial:
        if "input_size" not in parameters:
            raise TritonLayoutError(
                f"{where}: input dims {in_dims} take any size; chanseg resizes every image to one: give it as "
                'parameters { key: "input_size" value { string_value: "H,W" } }'
            )
        spatial = [int(v) for v in _numbers(parameters["input_size"].string_value, 2, "input_size", where)]
    if any(not 1 <= s <= MAX_SIDE for s in spatial):
        raise TritonLayoutError(f"{where}: input size {spatial}: each side must be within 1..{MAX_SIDE}")
    if any(o not in (-1, s) for o, s in zip(out_dims[1:], spatial)):
        raise TritonLayoutError(
            f"{where}: output dims {out_dims} for an input of {spatial[0]}x{spatial[1]}: chanseg needs logits at the "
            "input's size (-1 or the input's H and W)"
        )
    classes = _labels(name, folder, out.label_filename, out_dims[0], where)
    mean = (
        _numbers(parameters["mean"].string_value, 3, "mean", where) if "mean" in parameters else IMAGENET_MEAN
    )
    std = _numbers(parameters["std"].string_value, 3, "std", where) if "std" in parameters else IMAGENET_STD
    if any(s <= 0 for s in std):
        raise TritonLayoutError(f"{where}: std must be positive, got {list(std)}")
    most = config.max_batch_size if batched else (1 if 1 in (in_batch, out_batch) else None)
    return {
        "class_names": classes, "input_size": tuple(spatial), "mean": tuple(mean), "std": tuple(std),
        "channels_last_input": channels_last, "max_batch": most,
    }  # fmt: skip


def _type_name(value: int) -> str:
    pb = _model_config_class()
    try:
        return pb.DataType.Name(value)
    except ValueError:
        return str(value)


def _unbatched(dims: List[int], batched: bool, what: str, where: str) -> Tuple[List[int], Optional[int]]:
    """(the dims without the batch dim, the batch dim when max_batch_size is 0)."""
    if batched or not dims:
        return dims, None
    if dims[0] not in (-1, 1):
        raise TritonLayoutError(
            f"{where}: {what} dims {dims} with max_batch_size 0: the first dim is the batch, so -1 or 1"
        )
    return dims[1:], dims[0]


def _numbers(text: str, count: int, key: str, where: str) -> Tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise TritonLayoutError(
            f"{where}: parameters {key} '{text[:100]}': give {count} comma-separated numbers"
        )
    return values


def _labels(name: str, folder: Path, filename: str, channels: int, where: str) -> Tuple[str, ...]:
    """The class names: the output's label file (in the model's folder), else ``class_<i>``."""
    if not filename:
        if channels < 2:
            raise TritonLayoutError(
                f"{where}: output dims give {channels} classes; chanseg needs the class count (2 or more) in the "
                "output's first dim, or a label_filename"
            )
        if channels > MAX_CLASSES:
            raise TritonLayoutError(f"{where}: {channels} classes; chanseg serves at most {MAX_CLASSES}")
        return tuple(f"class_{i}" for i in range(channels))
    plain_name(filename, "label_filename", name)
    path = (folder / filename).resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        raise TritonLayoutError(f"{where}: label_filename {filename[:100]}: not a file in the model's folder")
    with open(path, "rb") as f:
        data = f.read(MAX_LABELS_BYTES + 1)
    if len(data) > MAX_LABELS_BYTES:
        raise TritonLayoutError(f"{where}: label file {filename}: over {MAX_LABELS_BYTES >> 20} MiB")
    try:
        names = tuple(line.strip() for line in data.decode("utf-8").rstrip("\r\n").splitlines())
    except UnicodeDecodeError:
        raise TritonLayoutError(f"{where}: label file {filename}: not UTF-8 text") from None
    if not all(names) or any(len(n) > 200 for n in names):
        raise TritonLayoutError(
            f"{where}: label file {filename}: one class name (1 to 200 characters) a line"
        )
    if channels not in (-1, len(names)):
        raise TritonLayoutError(
            f"{where}: label file {filename} names {len(names)} classes, the output dims give {channels}"
        )
    if not 2 <= len(names) <= MAX_CLASSES:
        raise TritonLayoutError(f"{where}: {len(names)} classes; chanseg serves 2 to {MAX_CLASSES}")
    return names
