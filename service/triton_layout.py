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

What of ``config.pbtxt`` is read, checked, refused and ignored: :mod:`service.triton_config`.
"""

from __future__ import annotations

import hashlib
import json
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
from model.pretrained import cache_places

from . import triton_config
from .triton_config import CONFIG_FILE, TritonLayoutError, plain_name, read_config, specific

__all__ = [
    "TritonLayoutError", "TritonModel", "TritonVersion", "model_folders", "read_model", "triton_file", "prepared",
]  # fmt: skip

MODEL_FILE = "model.pt"  # Triton's PyTorch backend's default_model_filename
VERSION = re.compile(r"0|[1-9][0-9]{0,17}")  # a version folder's name: within int64, as Triton's


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
        named = specific(self.config)
        if named is not None and named not in self.versions:
            raise TritonLayoutError(
                f"{self.name}: version_policy names version {named}, but there is no "
                f"{self.name}/{named}/{self.model_file} (versions here: {', '.join(map(str, self.versions))})"
            )
        return TritonVersion(self, named if named is not None else self.versions[-1])


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
        config = read_config(root, folder, name)
        given = config.default_model_filename if config is not None else ""
        model_file = plain_name(given, "default_model_filename", name) or MODEL_FILE
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
        described = triton_config.described(found.name, found.folder, found.config)
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
    places = cache_places(cache)
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
