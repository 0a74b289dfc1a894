"""TorchScript artifacts: scripted networks saved with their config and metadata.

An artifact is a ``torch.jit.save`` file with two extra files: ``config.json``
(the :class:`ModelConfig`: classes, normalisation, input size) and
``meta.json`` (format, model name and version, chanseg and torch versions).
It is self-describing: :func:`read_artifact` needs nothing but the path.
Export is device-neutral (CPU, fp32, not frozen); device-specific passes
happen when :func:`model.load` puts it on its target.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from .network import ChannelAttentionUNet, ModelConfig, check_identifier

__all__ = [
    "ARTIFACT_FORMAT", "ModelLoadError", "Artifact", "export_torchscript", "read_artifact", "read_metadata", "script",
    "checked_meta", "read_extra", "MAX_METADATA_BYTES",
]  # fmt: skip

ARTIFACT_FORMAT = 1
_CONFIG_FILE, _META_FILE = "config.json", "meta.json"
# The most a config or metadata file may hold: a model with thousands of classes needs
# a few tens of kB; a larger one is not read (a repository is scanned file by file).
MAX_METADATA_BYTES = 256 << 10


class ModelLoadError(RuntimeError):
    """The artifact is missing, unreadable or not a chanseg TorchScript file."""


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


def export_torchscript(
    net: nn.Module,
    path: str | os.PathLike,
    config: ModelConfig | None = None,
    version: str = "1",
    extra_meta: Dict[str, Any] | None = None,
) -> Path:
    """Script ``net`` and save it with its config and metadata, atomically.

    Args:
        net: a :class:`ChannelAttentionUNet` (or any scriptable module).
        path: the file to write; it appears complete or not at all.
        config: defaults to ``net.config``.
        version: the model's version string, reported by servers.
        extra_meta: more JSON-serialisable metadata for ``meta.json``.

    Returns:
        The path written.
    """
    from . import __version__

    version = check_identifier("version", str(version))
    config = config or getattr(net, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError("export_torchscript needs a ModelConfig (pass config=)")
    was_training = net.training
    net = net.eval()
    try:
        scripted = script(net.cpu())
    finally:
        net.train(was_training)
    meta = {
        "format": ARTIFACT_FORMAT,
        "name": config.name,
        "version": str(version),
        "chanseg_version": __version__,
        "torch_version": torch.__version__,
        **(extra_meta or {}),
    }
    files = {_CONFIG_FILE: config.to_json(), _META_FILE: json.dumps(meta, indent=2)}
    path = Path(path)
    with written_atomically(path, ".tmp") as tmp, open(tmp, "wb") as f:
        torch.jit.save(scripted, f, _extra_files=files)
        f.flush()
        os.fsync(f.fileno())
    return path


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script``, after :func:`forget_freed_builtins`: what every scripting
    step of this package calls."""
    forget_freed_builtins()
    return torch.jit.script(module)


def forget_freed_builtins() -> None:
    """Drop the entries of TorchScript's builtin table whose functions are gone.

    TorchScript recognises builtin functions by ``id()`` (``torch.jit._builtins``).
    When ``torch.library`` adds an overload to an op whose packet was already looked
    up, the packet gets a new op object and the old one is freed, but its id stays
    in the table. Inductor's quantization passes do this to ``quantized_decomposed``'s
    ops, so in a process that compiled a package (``python -m model compile``, the
    test suite) any later object allocated at such an address, say a ``Conv2d``'s
    padding list, is taken for that op, and scripting fails at random with "builtin
    cannot be used as a value". Kept: the table's own list of builtins, the current
    op of every op packet, and every callable a loaded module holds (where the other
    registrations live).
    """
    from torch.jit import _builtins

    table = getattr(_builtins, "_builtin_table", None)
    if not table:
        return
    kept = {id(fn) for fn, _ in getattr(_builtins, "_builtin_ops", ())}
    for namespace in list(vars(torch.ops).values()):
        if isinstance(namespace, torch._ops._OpNamespace):
            ops = list(vars(namespace).values())
            kept.update(id(p._op) for p in ops if isinstance(p, torch._ops.OpOverloadPacket))
    for module in list(sys.modules.values()):
        kept.update(id(v) for v in list(getattr(module, "__dict__", {}).values()) if callable(v))
    for key in [key for key in table if key not in kept]:
        del table[key]


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


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Load an artifact on the CPU, in fp32, with its config and metadata.

    Raises:
        ModelLoadError: the file is missing, truncated, not TorchScript, or
            lacks chanseg's metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a TorchScript file (not a zip archive; truncated?)")
    try:
        with zipfile.ZipFile(path) as z:  # sizes checked before torch reads them
            for name in (_CONFIG_FILE, _META_FILE):
                read_extra(z, name, b"")
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    files = {_CONFIG_FILE: "", _META_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    except Exception as exc:  # torch raises RuntimeError, ValueError, ... from deep inside
        raise ModelLoadError(f"{path}: not a loadable TorchScript file: {_first_line(exc)}") from exc
    if not files[_CONFIG_FILE]:
        raise ModelLoadError(f"{path}: TorchScript file without chanseg metadata ({_CONFIG_FILE})")
    try:
        config = ModelConfig.from_json(_text(files[_CONFIG_FILE]))
        meta = json.loads(_text(files[_META_FILE]) or "{}")
    except (ValueError, TypeError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: invalid chanseg metadata: {exc}") from exc
    if int(meta.get("format", 0)) > ARTIFACT_FORMAT:
        raise ModelLoadError(f"{path}: artifact format {meta['format']} is newer than this chanseg supports")
    return Artifact(module, config, checked_meta(path, meta), path)


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


def read_metadata(path: str | os.PathLike) -> tuple[ModelConfig, Dict[str, Any]]:
    """The config and metadata of an artifact or a compiled package, read from the archive
    without loading its code (a model repository's index lists files this way).

    Raises:
        ModelLoadError: not a chanseg artifact or package.
    """
    from .compiled import is_package, read_meta

    if is_package(path):
        return read_meta(path)
    try:
        with zipfile.ZipFile(path) as z:
            config = ModelConfig.from_json(read_extra(z, _CONFIG_FILE).decode())
            meta = json.loads(read_extra(z, _META_FILE, b"{}"))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError, TypeError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: not a chanseg artifact ({type(exc).__name__}: {exc})") from exc
    return config, checked_meta(path, meta)


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


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def build_network(
    config: ModelConfig, state_dict: Dict[str, torch.Tensor] | None = None
) -> ChannelAttentionUNet:
    """A network for ``config``, with ``state_dict`` loaded strictly when given."""
    if config.network != "channel-attention-unet":
        raise ModelLoadError(
            f"{config.name} is an imported model: chanseg cannot rebuild its network from weights "
            "(python -m model compile converts its TorchScript instead)"
        )
    net = ChannelAttentionUNet(config)
    if state_dict is not None:
        net.load_state_dict(state_dict, strict=True)
    return net.eval()
