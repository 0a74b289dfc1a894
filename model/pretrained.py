"""The bundled default model: weights shipped in the package, compiled on first use.

``model/weights/default.safetensors`` + ``default.json`` (the config) are the
weights of the default network trained on the synthetic shapes (how: docs/model.md, "The bundled default model").
``default_artifact_path()`` scripts them into a TorchScript artifact in a cache
directory, keyed by the weights' and config's hash and by the torch and
chanseg versions, so an upgrade never loads a stale artifact; later calls
reuse the file, and a corrupt entry is rebuilt.

Cache directory: ``$CHANSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/chanseg``,
else ``~/.cache/chanseg``; a temporary directory when none is writable.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import stat
import tempfile
from importlib import resources
from pathlib import Path
from typing import List, Optional

import torch
from safetensors.torch import load_file

from . import hardware
from .artifact import Artifact, ModelLoadError, written_atomically
from .autoprecision import TOLERANCE, compile_and_choose
from .compiled import read_package
from .export import build_network, export_torchscript, read_artifact
from .network import ModelConfig
from .version import __version__

__all__ = [
    "default_weights",
    "default_config",
    "default_artifact",
    "default_artifact_path",
    "default_package",
    "default_package_path",
    "compile_default",
    "precision_record_path",
    "cache_dir",
    "fallback_cache_dir",
]

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


def fallback_cache_dir() -> Optional[Path]:
    """Where the cache goes when :func:`cache_dir` is read-only (a container's):
    ``$TMPDIR/chanseg-cache-<uid>``. A temporary directory is shared with every user of
    the machine, and what is cached here is loaded as code (an artifact) or trusted (a
    measurement): this one is created for this user alone (0700), and one that exists is
    used only when it is a directory of this user's that nobody else may write, else None."""
    path = Path(tempfile.gettempdir()) / f"chanseg-cache-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(path)  # a link planted at that name is not followed
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        log.warning("not using %s as a cache: it is not a directory of this user's alone (0700)", path)
        return None
    return path


def cache_places(directory: str | os.PathLike | None = None) -> List[Path]:
    """Where cached files are looked for and written, in order: ``directory`` (else
    :func:`cache_dir`), then this user's private fallback when there is one."""
    primary = Path(directory) if directory is not None else cache_dir()
    return [primary] + ([fallback] if (fallback := fallback_cache_dir()) is not None else [])


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


def _key() -> tuple[str, str, str]:
    """(weights digest, cache key, config JSON) of the bundled model."""
    weights = default_weights()
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: the bundled default weights are missing from the package")
    config_text = (_weights_dir() / "default.json").read_text()
    digest = hashlib.sha256(weights.read_bytes() + config_text.encode()).hexdigest()
    return (
        digest,
        f"{digest[:16]}-torch{torch.__version__.replace('+', '_')}-chanseg{__version__}",
        config_text,
    )


def default_package_path(
    device: torch.device, precision: str, directory: str | os.PathLike | None = None
) -> Path:
    """Where the bundled model compiled for this machine, device and precision lives
    (``python -m model compile`` writes it; it may not exist)."""
    root = Path(directory) if directory is not None else cache_dir()
    return root / f"default-{_key()[1]}-{hardware.machine_key(device)}-{precision}.pt2"


def precision_record_path(device: torch.device, directory: str | os.PathLike | None = None) -> Path:
    """Where ``python -m model compile --precision auto`` records the precisions it
    measured on this machine and the one it chose."""
    root = Path(directory) if directory is not None else cache_dir()
    return root / f"precision-{_key()[1]}-{hardware.machine_key(device)}.json"


def _cached(directory: str | os.PathLike | None) -> tuple[Path, Artifact]:
    digest, key, config_text = _key()
    weights = default_weights()
    root = Path(directory) if directory is not None else cache_dir()
    name = f"default-{key}.pt"

    def reused(path: Path) -> Optional[tuple[Path, Artifact]]:
        if path.is_file():  # a read-only cache (a container's) is fine when it holds the file
            try:
                return path, read_artifact(path)
            except ModelLoadError as exc:
                log.warning("rebuilding corrupt cached artifact %s: %s", path, exc)
        return None

    if found := reused(root / name):
        return found
    if not _writable(root):
        fallback = fallback_cache_dir() or Path(tempfile.mkdtemp(prefix="chanseg-cache-"))
        log.warning("cache directory %s is not writable; using %s", root, fallback)
        root = fallback
        if found := reused(root / name):
            return found
    path = root / name
    config = ModelConfig.from_json(config_text)
    net = build_network(config, load_file(str(weights)))
    export_torchscript(net, path, config, version=digest[:12], extra_meta={"weights_sha256": digest})
    return path, read_artifact(path)


def default_package(
    device: torch.device, precision: str, build: bool = False, directory: str | os.PathLike | None = None
) -> Artifact | None:
    """The bundled model's package for this machine from the cache (``directory``, default
    :func:`cache_dir`; compiled first when ``build``), or None when there is none or it
    cannot run here (TorchScript then serves; the reason is logged)."""
    if precision == "auto":
        record = precision_record_path(device, directory)
        if not record.is_file():
            if not build:
                return None
            compile_default(device, "auto", directory=directory)
        try:
            precision = json.loads(record.read_text())["chosen"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable precision record %s: %s", record, exc)
            return None
    path = default_package_path(device, precision, directory)
    if not path.is_file():
        if not build:
            return None
        compile_default(device, precision, directory=directory)
    try:
        return read_package(path, device)
    except ModelLoadError as exc:
        if build:
            raise
        log.warning("not using the compiled package %s: %s; TorchScript serves", path, exc)
        return None


def compile_default(
    device: torch.device,
    precision: str = "auto",
    data: str = "synthetic",
    count: int = 64,
    directory: str | os.PathLike | None = None,
) -> dict:
    """Compile the bundled model for this machine into the cache (``directory``, default
    :func:`cache_dir`): one precision, or
    with ``auto`` each one the hardware has, each scored (held-out mIoU) and timed,
    and the choice recorded (``precision_record_path``). Returns the record."""
    config = default_config()
    net = build_network(config, load_file(str(default_weights())))
    results, chosen = compile_and_choose(
        net,
        config,
        device,
        precision,
        lambda p: default_package_path(device, p, directory),
        version=_key()[0][:12],
        data=data,
        count=count,
    )
    record = {
        "device": str(device),
        "results": results,
        "chosen": chosen,
        "tolerance": TOLERANCE,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if precision == "auto":  # read by every replica that starts: whole or not at all
        with written_atomically(precision_record_path(device, directory), ".json") as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2))
    return record
