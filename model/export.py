"""TorchScript artifacts: scripted networks saved with their config and metadata (the
``torchscript`` format; ``model/compiled.py`` is the other one).

An artifact is a ``torch.jit.save`` file with two extra files: ``config.json``
(the :class:`ModelConfig`: classes, normalisation, input size) and
``meta.json`` (format, model name and version, chanseg and torch versions).
It is self-describing: :func:`read_artifact` needs nothing but the path.
Export is device-neutral (CPU, fp32, not frozen); device-specific passes
happen when :func:`model.load` puts it on its target.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from .artifact import Artifact, ModelLoadError, checked_meta, read_extra, written_atomically
from .network import ChannelAttentionUNet, ModelConfig, check_identifier
from .version import __version__

__all__ = [
    "ARTIFACT_FORMAT", "export_torchscript", "read_artifact", "read_artifact_meta", "script", "build_network",
]  # fmt: skip

ARTIFACT_FORMAT = 1  # the version of this layout, in meta.json's "format"
_CONFIG_FILE, _META_FILE = "config.json", "meta.json"


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


def read_artifact_meta(path: str | os.PathLike) -> tuple[ModelConfig, Dict[str, Any]]:
    """An artifact's config and metadata, read from the archive without loading its code.

    Raises:
        ModelLoadError: not a chanseg artifact.
    """
    try:
        with zipfile.ZipFile(path) as z:
            config = ModelConfig.from_json(read_extra(z, _CONFIG_FILE).decode())
            meta = json.loads(read_extra(z, _META_FILE, b"{}"))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError, TypeError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: not a chanseg artifact ({type(exc).__name__}: {exc})") from exc
    return config, checked_meta(path, meta)


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
