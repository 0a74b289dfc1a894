"""Compiled packages: the network through ``torch.export`` and AOTInductor, for one
device, precision and CPU instruction set.

A package is a ``.pt2`` file written by ``torch._inductor.aoti_compile_and_package``
from ``torch.export.export`` of the network (a dynamic batch dimension, weights
frozen into the compiled code), with chanseg's config and metadata added as the
archive's extra files (``<root>/extra/chanseg_config.json``, ``chanseg_meta.json``). It takes what the TorchScript
artifact's module takes (normalised ``(N, 3, H, W)`` floats at the input size,
channels-last on CPU, in the package's dtype), so :class:`model.Segmenter`
runs either. It is self-describing like the TorchScript artifact, and
``model.load`` tells the two apart by their contents.

Inductor writes code for the instruction set of the machine it compiles on
(AVX-512, VNNI, AMX tiles): a package compiled where AMX exists would fault
where it does not, so loading checks the package's recorded instruction set
against this CPU and refuses with a message instead (compile it again on the
serving machine: ``python -m model compile``). Compiling takes tens of seconds
to minutes (a C++ compiler runs), so it happens at export, at image build or
once into the cache, never on a request.

Why: on a 2-core Xeon with AMX (2026-11-29), batch-1 images/s of the bundled
network were 9.1 with the frozen channels-last TorchScript fp32, 12.7 with this
package in fp32 and 26.7 in bf16 (``benchmarks/model_speed.py`` has the table).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import tempfile
import warnings
import weakref
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

import torch
from torch import nn

from . import hardware
from .artifact import PACKAGE, Artifact, ModelLoadError, checked_meta, read_extra, written_atomically
from .network import ModelConfig, check_identifier
from .precision import PRECISIONS
from .version import __version__

__all__ = [
    "compile_package",
    "is_package",
    "missing_instructions",
    "read_package",
]

log = logging.getLogger(__name__)

# What a package's metadata says it is: "package" (artifact.PACKAGE). Packages written by
# earlier versions say "aoti" (AOTInductor's name); read_meta gives them the one name.
_FORMAT_NAMES = (PACKAGE, "aoti")
_CONFIG, _META = "chanseg_config.json", "chanseg_meta.json"  # the archive's extra/ files
# AOTInductor's names for the instruction sets it compiled for -> /proc/cpuinfo flags.
_ISA_FLAGS = {
    "AVX2": {"avx2"},
    "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "AVX512_VNNI": {"avx512_vnni"},
    "AVX512_BF16": {"avx512_bf16"},
    "AMX_TILE": {"amx_tile"},
    "AMX_BF16": {"amx_bf16"},
    "AMX_INT8": {"amx_int8"},
}


def missing_instructions(isa: str, flags: Optional[Set[str]] = None) -> Set[str]:
    """The instruction sets in ``isa`` (AOTInductor's ``AOTI_CPU_ISA``, space separated)
    that this CPU lacks."""
    flags = hardware.cpu_flags() if flags is None else flags
    if not flags:
        return set()  # not Linux: nothing to check against
    return {name for name in isa.split() if not _ISA_FLAGS.get(name, set()) <= flags}


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a compiled package (not a TorchScript artifact)."""
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(read_extra(z, _META))
            return isinstance(meta, dict) and meta.get("format") in _FORMAT_NAMES
    except (OSError, KeyError, zipfile.BadZipFile, ValueError, RecursionError):
        return False


def compile_package(
    net: nn.Module,
    path: str | os.PathLike,
    config: Optional[ModelConfig] = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    version: str = "1",
    max_batch: int = 64,
    extra_meta: Optional[Dict[str, Any]] = None,
    evaluate: Optional[Callable[[Artifact], Dict[str, Any]]] = None,
) -> Path:
    """Export ``net`` and compile it for ``device`` and ``precision`` into a package at
    ``path`` (written atomically). ``max_batch``: the largest batch it will run.
    ``evaluate``: called with the compiled package before it is written; what it
    returns is recorded in the package's metadata as ``evaluation``.

    Raises:
        ModelLoadError: an unknown precision, or one this device cannot compile.
    """
    version = check_identifier("version", str(version))
    config = config or getattr(net, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError("compile_package needs a ModelConfig (pass config=)")
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    dtype = PRECISIONS[precision]
    channels_last = device.type == "cpu"
    net = net.eval().to(device=device, dtype=dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    h, w = config.input_size
    example = torch.randn(2, config.in_channels, h, w, device=device, dtype=dtype)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside export
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    path = Path(path)
    with written_atomically(path, ".pt2") as tmp:  # AOTInductor wants the .pt2 suffix
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp, inductor_configs={"freezing": True}
            )
        runner = torch._inductor.aoti_load_package(tmp)
        isa = str(runner.get_metadata().get("AOTI_CPU_ISA", "")) if device.type == "cpu" else ""
        meta = {
            "format": PACKAGE,
            "name": config.name,
            "version": str(version),
            "device": device.type,
            "precision": precision,
            "channels_last": channels_last,
            "cpu_isa": isa,
            "max_batch": max_batch,
            "parameters": sum(p.numel() for p in net.parameters()),
            "chanseg_version": __version__,
            "torch_version": torch.__version__,
            **(extra_meta or {}),
        }
        if evaluate is not None:
            meta["evaluation"] = evaluate(Artifact(runner, config, dict(meta), path))
        del runner
        with zipfile.ZipFile(tmp, "a") as z:
            root = z.namelist()[0].split("/", 1)[0]
            z.writestr(f"{root}/extra/{_CONFIG}", config.to_json())
            z.writestr(f"{root}/extra/{_META}", json.dumps(meta, indent=2))
    return path


def read_meta(path: str | os.PathLike) -> tuple[ModelConfig, Dict[str, Any]]:
    """A package's config and metadata, without loading its code (its ``format`` is
    ``package`` whichever name the chanseg that wrote it used)."""
    try:
        with zipfile.ZipFile(path) as z:
            config = ModelConfig.from_json(read_extra(z, _CONFIG).decode())
            meta = json.loads(read_extra(z, _META))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError, TypeError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: not a chanseg package ({exc})") from exc
    meta = checked_meta(path, meta)
    if meta.get("format") in _FORMAT_NAMES:
        meta["format"] = PACKAGE
    return config, meta


def read_package(path: str | os.PathLike, device: torch.device) -> Artifact:
    """Load a package for ``device``; its ``module`` is the compiled model (a callable).

    Raises:
        ModelLoadError: not a package, compiled for another device type, or for
            instructions this CPU lacks.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    config, meta = read_meta(path)
    if meta.get("device") != device.type:
        raise ModelLoadError(
            f"{path} was compiled for {meta.get('device')}, not {device.type}: compile one for this "
            "device (python -m model compile, or export --format package)"
        )
    lacking = missing_instructions(str(meta.get("cpu_isa", ""))) if device.type == "cpu" else set()
    if lacking:
        raise ModelLoadError(
            f"{path} was compiled for {' '.join(sorted(lacking))}, which this CPU lacks: compile it on "
            "this machine (python -m model compile)"
        )
    if meta.get("torch_version") != torch.__version__:
        raise ModelLoadError(
            f"{path} was compiled with torch {meta.get('torch_version')}, this is {torch.__version__}: "
            "compile it again"
        )
    if device.type == "cpu":
        try:
            return Artifact(NativeRunner(path), config, meta, path)
        except ModelLoadError:
            raise
        except Exception as exc:  # an archive laid out differently by another torch: the loader below
            log.warning(
                "%s: calling the compiled model through its C interface failed (%s); "
                "using torch's loader, which holds the GIL while it runs",
                path,
                exc,
            )
    from torch.export.pt2_archive._package import load_pt2

    with zipfile.ZipFile(path) as z:  # torch's loader unpacks all of it
        check_extractable(path, z.infolist())
    index = (device.index or 0) if device.type == "cuda" else -1
    try:
        runner = load_pt2(str(path), device_index=index).aoti_runners["model"]
    except Exception as exc:  # the loader raises RuntimeError, KeyError, ... from C++
        raise ModelLoadError(f"{path}: the compiled package does not load: {exc}") from exc
    return Artifact(runner, config, meta, path)


# Calls one package may run at once (a server's inference streams): the container
# holds as many model instances, which share the weights (4 instead of 1: +1 MiB
# here); a call beyond them waits for a free one.
CONCURRENT_CALLS = max(2, os.cpu_count() or 1)


# What a package may unpack into the temporary directory: the bundled model's library is
# 9.6 MiB; one of a 100 M-parameter network with its weights inside ~400 MiB.
MAX_EXTRACTED_BYTES = 4 << 30
MAX_COMPRESSION_RATIO = 50  # compiled code and weights compress 1.1-3x; a bomb ~1000x
_SPARE_BYTES = 64 << 20  # left free in the temporary directory


def check_extractable(archive: str | os.PathLike, members: List[zipfile.ZipInfo]) -> None:
    """Raise :class:`ModelLoadError` unless ``members`` can be unpacked into the temporary
    directory: no more than :data:`MAX_EXTRACTED_BYTES`, than its free space (less a margin:
    a pod's ``/tmp`` is small, and the rest of the process needs it), or than
    :data:`MAX_COMPRESSION_RATIO` times what they take in the archive (a compression bomb)."""
    size = sum(m.file_size for m in members)
    packed = sum(m.compress_size for m in members)
    free = shutil.disk_usage(tempfile.gettempdir()).free - _SPARE_BYTES
    if size > MAX_EXTRACTED_BYTES or size > free:
        raise ModelLoadError(
            f"{archive}: unpacking it takes {size / 2**20:.0f} MiB, more than the temporary directory "
            f"({tempfile.gettempdir()}) has free ({max(0, free) / 2**20:.0f} MiB) or than a package may "
            f"({MAX_EXTRACTED_BYTES / 2**30:.0f} GiB)"
        )
    if size > 1 << 20 and size > MAX_COMPRESSION_RATIO * max(1, packed):
        raise ModelLoadError(
            f"{archive}: {size / 2**20:.0f} MiB packed into {packed / 2**20:.1f} MiB: not a compiled model "
            "(a compression bomb?)"
        )


class NativeRunner:
    """A CPU package's compiled model, called through AOTInductor's C interface
    (``AOTInductorModelContainerRun``) with ctypes, which releases the GIL for the call.

    Why: torch's Python binding of the AOTInductor runner holds the GIL for the
    whole forward pass (torch 2.13; pytorch/pytorch#197516), so while a batch ran
    the server's event loop and decoding threads stood still: measured here, a
    Python thread woke 132 times in 3 s beside the loader's loop (longest gap
    76 ms, one batch) against 2,555 times beside this one (longest gap 5 ms), at
    the same speed and with bit-identical outputs. The tensors cross the boundary
    as torch's own ``AtenTensorHandle``s (``torch._C._aoti``'s helpers, which
    Inductor's generated code uses); the model takes ownership of the input
    handles and hands over the outputs'.
    """

    def __init__(self, archive: str | os.PathLike) -> None:
        with zipfile.ZipFile(archive) as z:
            libraries = [n for n in z.namelist() if "/data/aotinductor/model/" in n and n.endswith(".so")]
            if len(libraries) != 1:
                raise RuntimeError(f"expected one compiled library in the archive, found {len(libraries)}")
            check_extractable(archive, [z.getinfo(libraries[0])])
            # The library is extracted, loaded and its container created, then its
            # file is deleted at once: the mapping outlives the file. A copy kept
            # until the runner is freed was left behind by every process that never
            # got there (SIGKILL, an OOM kill, the stuck-batch exit), 9 MiB each time
            # in a pod's /tmp, which outlives the container and has a size limit.
            workdir = tempfile.mkdtemp(prefix="chanseg-aoti-")
            try:
                lib = ctypes.CDLL(z.extract(libraries[0], workdir))
                handle = ctypes.c_void_p()
                instances = ctypes.c_size_t(CONCURRENT_CALLS)
                if lib.AOTInductorModelContainerCreateWithDevice(
                    ctypes.byref(handle), instances, b"cpu", None
                ):
                    raise RuntimeError("AOTInductorModelContainerCreateWithDevice failed")
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        self._finalizer = weakref.finalize(self, lib.AOTInductorModelContainerDelete, handle)
        outputs = ctypes.c_size_t()
        if lib.AOTInductorModelContainerGetNumOutputs(handle, ctypes.byref(outputs)):
            raise RuntimeError("AOTInductorModelContainerGetNumOutputs failed")
        self._lib, self._handle, self._outputs = lib, handle, outputs.value

    def __call__(self, *inputs: torch.Tensor):
        handles = [
            _capsule_pointer(c) for c in torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(list(inputs))
        ]
        given = (ctypes.c_void_p * len(handles))(*handles)
        out = (ctypes.c_void_p * self._outputs)()
        failed = self._lib.AOTInductorModelContainerRun(
            self._handle,
            given,
            ctypes.c_size_t(len(handles)),
            out,
            ctypes.c_size_t(self._outputs),
            None,
            None,
        )  # the GIL is released for the call (ctypes.CDLL)
        if failed:
            raise RuntimeError(
                "the compiled model failed (AOTInductorModelContainerRun); its error is on stderr"
            )
        tensors = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_new_capsule(p) for p in out])
        return tensors[0] if len(tensors) == 1 else tensors


_capi = ctypes.pythonapi
_capi.PyCapsule_GetPointer.restype = ctypes.c_void_p
_capi.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capi.PyCapsule_New.restype = ctypes.py_object
_capi.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _capsule_pointer(capsule) -> int:
    return _capi.PyCapsule_GetPointer(capsule, None)


def _new_capsule(pointer: int):
    return _capi.PyCapsule_New(pointer, None, None)
