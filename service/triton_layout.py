"""Triton's model-repository layout inside ``MODEL_REPOSITORY``, beside chanseg's flat one::

    <repository>/<name>/config.pbtxt          optional
    <repository>/<name>/<version>/model.pt    <version>: a non-negative integer, the folder's name

A model is a folder directly inside the repository that holds ``config.pbtxt`` or a version
folder with the model file in it. Its name is the folder's; a version is its folder's number
(written without leading zeros: ``01`` is not a version). A version's file is either a
chanseg artifact or compiled package, served as it is under the folder's name and number,
or a plain TorchScript file of Triton's PyTorch backend (``torch.jit.save`` of a module
that maps a float ``(N, 3, H, W)`` batch to logits ``(N, C, H, W)``), wrapped once into a
chanseg artifact in the cache directory with what ``config.pbtxt`` says (:func:`prepared`,
as ``python -m model import`` does), keyed by the file's and the description's hash.

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

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

import model
from model.artifact import ModelLoadError
from model.imported import import_torchscript
from model.loading import read_metadata
from model.network import check_identifier
from model.pretrained import cache_dir as default_cache_dir
from model.pretrained import fallback_cache_dir

__all__ = [
    "TritonLayoutError", "TritonModel", "TritonVersion", "model_folders", "read_model", "triton_file", "prepared",
]  # fmt: skip

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.pt"  # Triton's PyTorch backend's default_model_filename
MAX_CONFIG_BYTES = 1 << 20
MAX_LABELS_BYTES = 1 << 20
MAX_SIDE = 4096  # of the input size: a plain model is checked on a batch of two at that size
MAX_CLASSES = 256  # masks are uint8 class ids
VERSION = re.compile(r"0|[1-9][0-9]{0,17}")  # a version folder's name: within int64, as Triton's
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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


@dataclass(frozen=True)
class TritonModel:
    """A model folder: its name, folder (resolved), config (Triton's ``ModelConfig``, or
    None without ``config.pbtxt``), the file in each version folder and the versions there."""

    name: str
    folder: Path
    config: Any = field(repr=False, compare=False)  # model_config_pb2.ModelConfig, or None
    model_file: str = MODEL_FILE
    versions: Tuple[int, ...] = ()  # ascending

    @property
    def max_batch_size(self) -> int:
        return int(self.config.max_batch_size) if self.config is not None else 0

    def chosen(self) -> "TritonVersion":
        """The version the policy serves: the highest (``latest``), or the one named (``specific``)."""
        if not self.versions:
            raise TritonLayoutError(
                f"{self.name}: no version folder (<number>/{self.model_file}) in the model's folder"
            )
        specific = _specific(self.config)
        if specific is not None and specific not in self.versions:
            raise TritonLayoutError(
                f"{self.name}: version_policy names version {specific}, but there is no "
                f"{self.name}/{specific}/{self.model_file} (versions here: {', '.join(map(str, self.versions))})"
            )
        return TritonVersion(self, specific if specific is not None else self.versions[-1])


@dataclass(frozen=True)
class TritonVersion:
    """One version of a :class:`TritonModel`: what a load serves."""

    model: TritonModel
    version: int

    @property
    def path(self) -> Path:
        return (self.model.folder / str(self.version) / self.model.model_file).resolve()

    @property
    def shown(self) -> str:
        """Its file, relative to the repository."""
        return f"{self.model.name}/{self.version}/{self.model.model_file}"


def model_folders(root: Path) -> List[str]:
    """The names of the folders directly in ``root`` (resolved) laid out as Triton models,
    links that lead out of ``root`` left out. Reads the file system: off the event loop."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    return [entry.name for entry in entries if _is_model_folder(root, entry)]


def _is_model_folder(root: Path, entry: Path) -> bool:
    try:
        folder = entry.resolve()
        if not (folder.is_relative_to(root) and folder.is_dir()):
            return False
        return (folder / CONFIG_FILE).is_file() or any(
            VERSION.fullmatch(sub.name) and (sub / MODEL_FILE).is_file() for sub in folder.iterdir()
        )
    except (OSError, RuntimeError):  # a link loop, a folder gone meanwhile
        return False


def read_model(root: Path, name: str) -> TritonModel:
    """Model ``name`` of the repository at ``root`` (resolved), its config read and checked.

    Raises:
        TritonLayoutError: no such model folder, or one chanseg cannot serve (the reason)."""
    try:
        check_identifier("name", name)
    except ValueError as exc:
        raise TritonLayoutError(f"a Triton model folder: {exc}") from None
    try:
        folder = (root / name).resolve()
        if not folder.is_relative_to(root):
            raise TritonLayoutError(f"{name}: a link out of the model repository")
        if not folder.is_dir():
            raise TritonLayoutError(f"{name}: no such model folder in the model repository")
        config = _read_config(root, folder, name)
        given = config.default_model_filename if config is not None else ""
        model_file = _plain_name(given, "default_model_filename", name) or MODEL_FILE
        versions = []
        for sub in folder.iterdir():
            if VERSION.fullmatch(sub.name):
                path = (sub / model_file).resolve()
                if path.is_relative_to(root) and path.is_file():
                    versions.append(int(sub.name))
    except TritonLayoutError:
        raise
    except (OSError, RuntimeError) as exc:  # RuntimeError: a link loop
        raise TritonLayoutError(f"{name}: {getattr(exc, 'strerror', None) or exc}") from None
    return TritonModel(name, folder, config, model_file, tuple(sorted(versions)))


def triton_file(root: Path, path: Path) -> Optional[TritonVersion]:
    """``path`` (resolved, in ``root``) as a version of a Triton model, ``<name>/<N>/<model
    file>`` of a model folder; None for any other file (chanseg's flat layout).

    Raises:
        TritonLayoutError: the model folder's config cannot be served."""
    parts = path.relative_to(root).parts
    if len(parts) != 3 or not VERSION.fullmatch(parts[1]) or not _is_model_folder(root, root / parts[0]):
        return None
    found = read_model(root, parts[0])
    return TritonVersion(found, int(parts[1])) if parts[2] == found.model_file else None


def _read_config(root: Path, folder: Path, name: str):
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
    _specific(config, where)


def _specific(config, where: str = "") -> Optional[int]:
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


def _plain_name(value: str, field: str, name: str) -> str:
    """``value`` when it names a file in the folder itself (no ``/``, not ``..``)."""
    if value and ("/" in value or "\\" in value or value in (".", "..") or "\0" in value or len(value) > 255):
        raise TritonLayoutError(f"{name}/{CONFIG_FILE}: {field} must be a file name in the model's folder")
    return value


# -- a plain TorchScript file: what config.pbtxt says about it ---------------------------------


def _described(found: TritonModel) -> Dict[str, Any]:
    """The :func:`import_torchscript` arguments for a plain TorchScript version of ``found``:
    class names, input size, mean, std, channels_last_input; and ``max_batch``."""
    name, config = found.name, found.config
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
    classes = _labels(found, out.label_filename, out_dims[0], where)
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


def _labels(found: TritonModel, filename: str, channels: int, where: str) -> Tuple[str, ...]:
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
    _plain_name(filename, "label_filename", found.name)
    path = (found.folder / filename).resolve()
    if not path.is_relative_to(found.folder) or not path.is_file():
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


# -- what a load reads ------------------------------------------------------------------------


def prepared(version: TritonVersion, cache: Optional[Path]) -> Tuple[Path, Dict[str, Any]]:
    """(the file to load, the metadata to serve it with) for ``version``: a chanseg artifact or
    package as it is, a plain TorchScript file wrapped into the cache (``cache``: the
    server's CACHE_DIR, None for the default), once per content and description.
    Runs torch (the wrap checks the model on a batch): on the inference thread.

    Raises:
        TritonLayoutError, ModelImportError: what is wrong with the config or the model."""
    found, path = version.model, version.path
    meta: Dict[str, Any] = {"name": found.name, "version": str(version.version)}
    try:
        _, own = read_metadata(path)
    except ModelLoadError:  # not chanseg's: a plain TorchScript file, as Triton's PyTorch backend takes
        described = _described(found)
        most = described.pop("max_batch")
        if most:
            meta["max_batch"] = most
        return _wrapped(version, path, described, cache), meta
    bounds = [int(b) for b in (own.get("max_batch"), found.max_batch_size) if b]
    if bounds:
        meta["max_batch"] = min(bounds)
    return path, meta


def _wrapped(version: TritonVersion, path: Path, described: Dict[str, Any], cache: Optional[Path]) -> Path:
    """The chanseg artifact of plain TorchScript ``path``, made once (written atomically)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    key = {
        "file_sha256": digest.hexdigest(), "name": version.model.name, "version": str(version.version),
        "chanseg": model.__version__, "torch": torch.__version__, **described,
    }  # fmt: skip
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    filename = f"{version.model.name}-{version.version}-{name}.pt"
    places = [Path(cache) if cache is not None else default_cache_dir()]
    if (fallback := fallback_cache_dir()) is not None:
        places.append(fallback)
    for place in places:
        if (place / "triton" / filename).is_file():
            return place / "triton" / filename
    problem: Optional[OSError] = None
    for place in places:
        out = place / "triton" / filename
        try:
            return import_torchscript(
                path, out, name=version.model.name, version=str(version.version),
                extra_meta={"imported_from": version.shown, "triton_file_sha256": key["file_sha256"]},
                **described,
            )  # fmt: skip
        except OSError as exc:  # a read-only cache: the next place
            problem = exc
    raise TritonLayoutError(
        f"{version.shown}: no writable cache directory for its chanseg artifact: {problem}"
    )
