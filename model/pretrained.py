"""The bundled default model: weights shipped in the package, compiled on first use.

``model/weights/default.safetensors`` + ``default.json`` (the config) are the
weights of the default network trained on the synthetic shapes (how: README).
``default_artifact_path()`` scripts them into a TorchScript artifact in a cache
directory, keyed by the weights' and config's hash and by the torch and
chanseg versions, so an upgrade never loads a stale artifact; later calls
reuse the file, and a corrupt entry is rebuilt.

Cache directory: ``$CHANSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/chanseg``,
else ``~/.cache/chanseg``; a temporary directory when none is writable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file

from .export import Artifact, ModelLoadError, build_network, export_torchscript, read_artifact
from .network import ModelConfig

__all__ = ["default_weights", "default_config", "default_artifact", "default_artifact_path", "cache_dir"]

log = logging.getLogger(__name__)


def _weights_dir() -> Path:
    return Path(str(resources.files("model") / "weights"))


def default_weights() -> Path:
    return _weights_dir() / "default.safetensors"


def default_config() -> ModelConfig:
    return ModelConfig.from_json((_weights_dir() / "default.json").read_text())


def cache_dir() -> Path:
    configured = os.environ.get("CHANSEG_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "chanseg"


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return os.access(directory, os.W_OK)
    except OSError:
        return False


def default_artifact_path(directory: str | os.PathLike | None = None) -> Path:
    """Path of the compiled default artifact, building it when missing or corrupt."""
    return _cached(directory)[0]


def default_artifact(directory: str | os.PathLike | None = None) -> Artifact:
    """The compiled default artifact, loaded (built first when missing or corrupt)."""
    return _cached(directory)[1]


def _cached(directory: str | os.PathLike | None) -> tuple[Path, Artifact]:
    from . import __version__

    weights = default_weights()
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: the bundled default weights are missing from the package")
    config_text = (_weights_dir() / "default.json").read_text()
    digest = hashlib.sha256(weights.read_bytes() + config_text.encode()).hexdigest()
    key = f"{digest[:16]}-torch{torch.__version__.replace('+', '_')}-chanseg{__version__}"
    root = Path(directory) if directory is not None else cache_dir()
    name = f"default-{key}.pt"
    if (root / name).is_file():  # a read-only cache (a container's) is fine when it holds the file
        try:
            return root / name, read_artifact(root / name)
        except ModelLoadError as exc:
            log.warning("rebuilding corrupt cached artifact %s: %s", root / name, exc)
    if not _writable(root):
        fallback = Path(tempfile.gettempdir()) / "chanseg-cache"
        log.warning("cache directory %s is not writable; using %s", root, fallback)
        root = fallback
        _writable(root)
    path = root / name
    config = ModelConfig.from_json(config_text)
    net = build_network(config, load_file(str(weights)))
    export_torchscript(net, path, config, version=digest[:12], extra_meta={"weights_sha256": digest})
    return path, read_artifact(path)
