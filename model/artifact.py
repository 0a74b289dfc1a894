"""What a model file's two formats share: their names, the :class:`Artifact` a reader
returns, :class:`ModelLoadError`, the metadata files inside the archive, and writing
a file atomically.

The formats are ``torchscript`` (``model/export.py``: a ``torch.jit.save`` file,
device-neutral) and ``package`` (``model/compiled.py``: torch.export + AOTInductor, for
one device, precision and CPU). Both are zip archives that carry chanseg's config and
metadata as extra files; ``model/loading.py`` tells them apart by their contents.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from .network import ModelConfig, check_identifier

__all__ = [
    "FORMATS",
    "PACKAGE",
    "TORCHSCRIPT",
    "MAX_METADATA_BYTES",
    "Artifact",
    "ModelLoadError",
    "checked_meta",
    "extra_member",
    "read_extra",
    "written_atomically",
]

TORCHSCRIPT, PACKAGE = "torchscript", "package"
FORMATS = (TORCHSCRIPT, PACKAGE)  # what `Segmenter.format` says; `load(format=...)` takes these or auto

# The most a config or metadata file may hold: a model with thousands of classes needs
# a few tens of kB; a larger one is not read (a repository is scanned file by file).
MAX_METADATA_BYTES = 256 << 10


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable or not chanseg's, or it cannot run here (the
    message says why: device, precision, instruction set, torch version)."""


@dataclass(frozen=True)
class Artifact:
    """A loaded (not yet device-placed) artifact."""

    module: torch.jit.ScriptModule
    config: ModelConfig
    meta: Dict[str, Any]
    path: Optional[Path] = None  # the file it was read from

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.config.name))

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "0"))

    @property
    def format(self) -> str:
        """:data:`PACKAGE` (a compiled package) or :data:`TORCHSCRIPT`."""
        return PACKAGE if self.meta.get("format") == PACKAGE else TORCHSCRIPT


def checked_meta(path: str | os.PathLike, meta: Dict[str, Any]) -> Dict[str, Any]:
    """``meta``, when it is an object whose name and version (if any) a server can send."""
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path}: its metadata is not a JSON object")
    try:
        for key in ("name", "version"):
            if key in meta:
                check_identifier(key, meta[key] if isinstance(meta[key], str) else str(meta[key]))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}; export or import it again with another") from None
    return meta


def extra_member(z: zipfile.ZipFile, name: str) -> Optional[str]:
    """The archive member holding extra file ``name`` (``torch.jit.save``'s and the
    packages' ``<root>/extra/<name>``), if any."""
    return next((n for n in z.namelist() if n.endswith(f"/extra/{name}")), None)


def read_extra(z: zipfile.ZipFile, name: str, default: Optional[bytes] = None) -> bytes:
    """Extra file ``name`` of the archive, at most :data:`MAX_METADATA_BYTES` (else ValueError);
    ``default`` when there is none (else KeyError)."""
    member = extra_member(z, name)
    if member is None:
        if default is None:
            raise KeyError(name)
        return default
    size = z.getinfo(member).file_size
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"{name} holds {size} bytes, more than metadata may ({MAX_METADATA_BYTES})")
    return z.read(member)


@contextlib.contextmanager
def written_atomically(path: Path, suffix: str) -> Iterator[str]:
    """A temporary file beside ``path`` to write; when the block ends without an error it
    replaces ``path`` (readable by everyone), otherwise it is removed: the file appears
    complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: a cache built as root is read by a service user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
