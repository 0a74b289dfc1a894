"""Model versions at run time: the Open Inference Protocol's model-repository extension
(``/v2/repository/...``, as Triton implements it) and ``SIGHUP`` (re-read ``MODEL_PATH``).

Off unless ``MODEL_REPOSITORY`` names a folder: the server may then load any chanseg
artifact or compiled package inside it, nothing outside it (``resolve``), and the models
laid out as Triton lays them out, ``<name>/<N>/model.pt`` with an optional
``<name>/config.pbtxt`` (:mod:`service.triton_layout`): named by their folder, versioned
by their version folder's number, a load without a path serving the version their
``version_policy`` picks (the highest by default). ``MODEL_PATH`` may name such a model's
folder, or one of its versions' files; unset, the repository's only Triton model (when it
holds exactly one) is served from start-up, as Triton serves its repository's models.

A load (``ModelRepository.load``) reads the new version and warms it up for every
batch size the batcher forms, on the inference thread, as jobs in its queue (the
load, then one per batch size): batches queued meanwhile run between them. The swap is one more job there, so it falls between
two batches. Each request is pinned to the version that served when it came in (the
routes pass ``served`` down the pipeline; a batch that straddles the swap runs each
request on its own version), so nothing in flight fails or changes model half-way;
the old version is freed when its last request is answered. A version that fails to
load or warm up is refused with the reason, and the old one keeps serving. At most
two versions are resident: a load waits for the version the last swap retired to go.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import model
from model.loading import read_metadata

from .errors import Conflict, DeadlineExceeded, Forbidden, InvalidRequest, NotReady
from .interface import ServedModel
from .resources import freeze_heap, release_free_memory, thaw_heap
from .triton_layout import (
    VERSION,
    TritonLayoutError,
    TritonModel,
    TritonVersion,
    model_folders,
    prepared,
    read_model,
    triton_file,
)
from .warmup import (
    BatchChoice,
    MeasurementCache,
    choose_batch_size,
    measure_throughput,
    measurement_key,
    now_iso,
    warm_up,
    warm_up_in_turns,
)

COLLECT_EVERY_S = 1.0  # while a load waits for the version it replaces (_wait_for_retired)
MAX_PATH = 1024  # characters of a path a load may name

log = logging.getLogger("chanseg.repository")

__all__ = ["ModelRepository", "Target", "load_path"]

# What a load reads: a file (chanseg's flat layout; None: the bundled model), or a version of
# a model in Triton's layout.
Target = Union[Optional[Path], TritonVersion]


class ModelRepository:
    """The versions a server may load (``MODEL_REPOSITORY``), and the swap."""

    def __init__(self, state) -> None:
        self.state = state
        self.root: Optional[Path] = state.settings.model_repository
        self._lock = asyncio.Lock()
        self._retired: Optional[weakref.ref] = None
        self.last_swap: Dict[str, Any] = {}  # what the last load measured (for the log and tests)
        # The repository file each loaded Triton version came from (a plain TorchScript one
        # serves from its wrapped copy in the cache), and the versions of each model the
        # last scan saw: what the data plane tells apart from an unknown version, without I/O.
        self._origin: "weakref.WeakKeyDictionary[ServedModel, Path]" = weakref.WeakKeyDictionary()
        self._versions: Dict[str, Tuple[str, ...]] = {}

    def _need(self) -> Path:
        if self.root is None:
            raise Forbidden(
                "the model repository is off: set MODEL_REPOSITORY to a folder of artifacts to enable it"
            )
        return self.root

    def resolve(self, given: str) -> Path:
        """``given`` (relative to the repository, or absolute) as a file inside the repository,
        links followed: a link inside it to a file outside it is refused like the file."""
        root = self._need()
        if "\0" in given or len(given) > MAX_PATH:
            raise InvalidRequest(
                f"parameters.path: not a file name (a NUL byte, or over {MAX_PATH} characters)"
            )
        try:
            path = (root / given).resolve()
            if not path.is_relative_to(root):
                raise InvalidRequest(
                    f"{given}: outside the model repository; only files inside it can be loaded"
                )
            if not path.is_file():
                raise InvalidRequest(f"{given}: no such file in the model repository")
        except (OSError, RuntimeError) as exc:  # RuntimeError: a link loop (Python < 3.13)
            raise InvalidRequest(f"{given[:200]}: {getattr(exc, 'strerror', None) or exc}") from None
        return path

    def _files(self) -> List[Path]:
        """The regular files inside the repository (resolved), links to outside it left out."""
        root, found = self._need(), []
        for folder, _, names in os.walk(root):  # links to folders are not followed
            for name in names:
                try:
                    path = Path(folder, name).resolve()
                    if path.is_relative_to(root) and path.is_file():
                        found.append(path)
                except (OSError, RuntimeError):  # a link loop, a name too long, a file gone meanwhile
                    continue
        return sorted(set(found))

    def versions(self, name: str) -> Tuple[str, ...]:
        """The versions of model ``name`` the last index or load saw in the repository (no I/O)."""
        return self._versions.get(name, ())

    def index(self) -> List[dict]:
        """Each model in the repository: every version of each Triton-layout model (or one row
        saying why the model cannot be served), then each chanseg artifact or package
        elsewhere; with name, version, path, state (``READY`` for the one serving, else
        ``UNAVAILABLE``) and why not. Reads files: call it off the event loop."""
        root = self._need()
        served = self.state.segmenter
        serving = self._origin.get(served) if served is not None else None
        if serving is None and served is not None and served.path:
            serving = Path(served.path).resolve()

        def row(name: str, version: str, path: str, ready: bool, reason: str = "not loaded") -> dict:
            state, reason = ("READY", "") if ready else ("UNAVAILABLE", reason)
            return {"name": name, "version": version, "path": path, "state": state, "reason": reason}

        rows: List[dict] = []
        seen: Dict[str, List[str]] = {}  # the versions of each model
        triton = model_folders(root)
        for name in triton:
            seen[name] = []
            try:
                found = read_model(root, name)
            except TritonLayoutError as exc:
                rows.append(row(name, "", name, False, self._shown(exc)))
                continue
            versions = [TritonVersion(found, v) for v in found.versions]
            seen[name] = [str(v) for v in found.versions]
            rows.extend(row(name, str(v.version), v.shown, v.path == serving) for v in versions)
            if not versions:
                rows.append(row(name, "", name, False, f"no version folder (<number>/{found.model_file})"))
        for path in self._files():
            parts = path.relative_to(root).parts
            if len(parts) == 3 and parts[0] in triton and VERSION.fullmatch(parts[1]):
                continue  # a file of a Triton model's version folder: listed above
            try:
                config, meta = read_metadata(path)
            except model.ModelLoadError:
                continue  # not a model: a README, a checksum file
            name, version = str(meta.get("name", config.name)), str(meta.get("version", "0"))
            if name not in triton:  # a load of that name serves the Triton model
                seen.setdefault(name, []).append(version)
            rows.append(row(name, version, str(path.relative_to(root)), path == serving))
        self._versions = {name: tuple(versions) for name, versions in seen.items()}
        return rows

    def _remember(self, found: TritonModel) -> TritonModel:
        self._versions[found.name] = tuple(str(v) for v in found.versions)
        return found

    def find(self, name: str, given: Optional[str]) -> Target:
        """What to load for model ``name``: ``given``, or for a model in Triton's layout the
        version its policy picks, or the only artifact of that name. Reads files: call it
        off the event loop."""
        root = self._need()
        if given is not None:
            path = self.resolve(given)
            try:
                version = triton_file(root, path)
            except TritonLayoutError as exc:
                raise InvalidRequest(f"failed to load {self._shown(exc)}; {self._kept()}") from None
            if version is not None:
                if version.model.name != name:
                    raise InvalidRequest(
                        f"{given} is a version of model '{version.model.name}', not '{name}'"
                    )
                self._remember(version.model)
                return version
            try:
                config, meta = read_metadata(path)
            except model.ModelLoadError as exc:
                raise InvalidRequest(f"failed to load {self._shown(exc)}; {self._kept()}") from None
            found = str(meta.get("name", config.name))
            if found != name:
                raise InvalidRequest(f"{given} holds model '{found}', not '{name}'")
            return path
        if name in model_folders(root):
            try:
                return self._remember(read_model(root, name)).chosen()
            except TritonLayoutError as exc:
                raise InvalidRequest(f"failed to load {self._shown(exc)}; {self._kept()}") from None
        matches = [row["path"] for row in self.index() if row["name"] == name]
        if len(matches) != 1:
            what = "no artifact" if not matches else f"{len(matches)} artifacts ({', '.join(matches)})"
            raise InvalidRequest(
                f"{what} of model '{name}' in the model repository: name one with "
                '{"parameters": {"path": "<file in the repository>"}}'
            )
        return self.root / matches[0]

    async def first_load(self, given: Optional[ServedModel]) -> ServedModel:
        """Start-up's load, brought up as every later one is: the model given to ``create_app``
        or ``MODEL_PATH`` loaded, ``MAX_BATCH_SIZE`` chosen (the setting, the measurement kept
        in the cache, or one made now), every size warmed up, then served (:meth:`_serve`).
        Within LOAD_TIMEOUT_S, else ``ModelLoadError``."""
        s, state = self.state.settings, self.state
        async with self._lock:
            since = time.monotonic()

            async def bring_up() -> tuple:
                if given is not None:
                    new = given
                else:
                    target = await asyncio.get_running_loop().run_in_executor(None, self.start_up_target)
                    new = await state.on_inference_thread(
                        "loading the model", self._reader(target), since=since
                    )
                log.info(
                    "model %s %s loaded on %s (%s, %s)",
                    new.name,
                    new.version,
                    new.device,
                    new.precision,
                    new.format,
                )
                return new, await self._choose_batch_size(new, since)

            try:  # a model whose load or warm-up never ends must not keep the server starting for ever
                new, (state.batching, seconds) = await asyncio.wait_for(bring_up(), s.load_timeout_s)
            except asyncio.TimeoutError:
                what = state.loading[0] if state.loading else "loading"
                raise model.ModelLoadError(
                    f"start-up did not finish within LOAD_TIMEOUT_S ({s.load_timeout_s:g} s): {what} was still running"
                ) from None
            state.max_batch_size = state.batching.max_batch_size
            await self._serve(new, seconds)
            await state.on_inference_thread("releasing memory", release_free_memory)  # what measuring freed
            return new

    def start_up_target(self) -> Target:
        """What start-up (and ``SIGHUP``) loads: ``MODEL_PATH``, or the version of a Triton-layout
        model it names (its folder, or inside ``MODEL_REPOSITORY`` a version's folder or file;
        the folder of one outside it is read as a repository of that one model); with
        ``MODEL_PATH`` unset, the repository's only Triton-layout model, else the bundled model
        (None). Reads files: off the event loop.

        Raises:
            TritonLayoutError: the model named cannot be served (why)."""
        given, root = self.state.settings.model_path, self.root
        if given is None:
            names = model_folders(root) if root is not None else []
            if len(names) > 1:
                log.info(
                    "MODEL_PATH unset: %d Triton-layout models in the repository, none served", len(names)
                )
            return self._remember(read_model(root, names[0])).chosen() if len(names) == 1 else None
        path = given.resolve()
        if root is None or not path.is_relative_to(root):
            if not path.is_dir():
                return given
            root = path.parent
        parts = path.relative_to(root).parts
        if path.is_dir() and len(parts) == 1:
            return self._remember(read_model(root, parts[0])).chosen()
        if path.is_dir() and len(parts) == 2 and VERSION.fullmatch(parts[1]):
            return TritonVersion(self._remember(read_model(root, parts[0])), int(parts[1]))
        version = triton_file(root, path) if path.is_file() else None
        if version is not None:
            self._remember(version.model)
        return version or given

    def _reader(self, target: Target) -> Callable[[], ServedModel]:
        """``target`` read and placed: a job for the inference thread (a plain TorchScript
        version of a Triton-layout model is wrapped first, once: ``triton_layout.prepared``)."""
        s = self.state.settings

        def read() -> ServedModel:
            if not isinstance(target, TritonVersion):
                return model.load(target, s.device, s.precision, format=s.model_format, cache_dir=s.cache_dir)
            path, meta = prepared(target, s.cache_dir)
            new = model.load(path, s.device, s.precision, format=s.model_format, meta=meta)
            self._origin[new] = target.path
            return new

        return read

    async def load(self, target: Target) -> ServedModel:
        """Load ``target``, warm it up and swap it in; the old version keeps serving if any step
        fails. Loading and warming up must end within LOAD_TIMEOUT_S (else 504, and liveness
        fails while the inference thread is still in it: ``ServerState.stuck``)."""
        if self._lock.locked():
            raise Conflict("another model load is in progress; retry when it is done")
        async with self._lock:
            self._check_thread()
            await self._wait_for_retired()
            s, state = self.state.settings, self.state
            started = time.perf_counter()
            shown = _shown_target(target)
            try:
                new, loaded, seconds = await asyncio.wait_for(
                    self._load_and_warm_up(target), s.load_timeout_s
                )
            except asyncio.TimeoutError:
                what = state.loading[0] if state.loading else "loading"
                log.error(
                    "model at %s refused: not loaded within LOAD_TIMEOUT_S (%s still running)", shown, what
                )
                raise DeadlineExceeded(
                    f"{shown} did not load and warm up within LOAD_TIMEOUT_S ({s.load_timeout_s:g} s): "
                    f"{what} is still running on the inference thread; {self._kept()}, and liveness fails "
                    "while the thread stays in it"
                ) from None
            except Exception as exc:  # any failure refuses the version: the one serving stays
                log.error("model at %s refused: %s: %s; %s", shown, type(exc).__name__, exc, self._kept())
                raise InvalidRequest(f"failed to load {self._shown(exc)}; {self._kept()}") from None
            old = await self._serve(new, seconds)
            self.last_swap = {
                "load_s": loaded - started, "warm_up_s": time.perf_counter() - loaded, "version": new.version,
            }  # fmt: skip
            log.info(
                "model %s %s now serving (was %s): loaded in %.2f s, warmed up in %.2f s",
                new.name, new.version, f"{old.name} {old.version}" if old is not None else "none",
                self.last_swap["load_s"], self.last_swap["warm_up_s"],
            )  # fmt: skip
            return new

    async def _serve(self, new: ServedModel, seconds: Dict[int, float]) -> Optional[ServedModel]:
        """``new`` serves every request from now on (swapped in between two batches), the
        watchdog follows its batch times (``seconds`` per warmed size), the version it
        replaces retires, and the heap is frozen with it. Returns the version replaced."""
        s, state = self.state.settings, self.state
        old = await state.on_inference_thread("swapping versions", self._swap, new)
        state.watchdog_s = (
            s.watchdog_s if s.watchdog_s != "auto" else max(10.0, 20 * max(seconds.values(), default=0.0))
        )
        self._retire(old)
        freeze_heap()  # the new version out of every full collection's walk
        return old

    async def _choose_batch_size(self, segmenter: ServedModel, since: float) -> tuple:
        """MAX_BATCH_SIZE: the setting, the measurement kept in the cache, or a fresh
        measurement (then kept); and every used size warmed up, with its batch time."""
        s, state = self.state.settings, self.state
        most = segmenter.max_batch or s.auto_batch_limit  # a compiled package's bound, config.pbtxt's
        if s.max_batch_size != "auto":
            if s.max_batch_size > most:
                raise model.ModelLoadError(
                    f"MAX_BATCH_SIZE ({s.max_batch_size}) is more than the model runs ({most}: a compiled package's "
                    "bound, or config.pbtxt's max_batch_size): lower it, or compile the package for larger batches"
                )
            choice = BatchChoice(s.max_batch_size, "setting")
            return choice, await state.on_inference_thread(
                "warming up",
                warm_up,
                segmenter,
                choice.max_batch_size,
                None,
                s.auto_batch_budget_s,
                since=since,
            )
        limit = min(s.auto_batch_limit, s.max_queue, most)
        key = await asyncio.get_running_loop().run_in_executor(
            None, measurement_key, segmenter, limit, s.auto_batch_budget_s
        )
        cache = MeasurementCache(key, s.cache_dir)
        choice = None if s.remeasure_batch_size else cache.load()
        measured: Dict[int, float] = {}
        if choice is None:
            throughput, measured, complete = await state.on_inference_thread(
                "measuring batch sizes",
                measure_throughput,
                segmenter,
                limit,
                s.auto_batch_budget_s,
                since=since,
            )
            choice = BatchChoice(choose_batch_size(throughput), "measured", throughput, now_iso(), complete)
            shown = {b: round(v, 1) for b, v in throughput.items()}
            if complete:
                where = cache.save(choice)
                log.info(
                    "MAX_BATCH_SIZE=auto chose %d from images/s %s (kept in %s)",
                    choice.max_batch_size,
                    shown,
                    where,
                )
            else:  # a busy machine, or a slow one: the next start measures again
                log.warning(
                    "MAX_BATCH_SIZE=auto chose %d from images/s %s for now: AUTO_BATCH_BUDGET_S (%g s) ran out "
                    "while larger batches were still faster; not kept, measured again at the next start",
                    choice.max_batch_size, shown, s.auto_batch_budget_s,
                )  # fmt: skip
        else:
            log.info(
                "MAX_BATCH_SIZE=auto: %d, measured %s (reused)", choice.max_batch_size, choice.measured_at
            )
        return choice, await state.on_inference_thread(
            "warming up",
            warm_up,
            segmenter,
            choice.max_batch_size,
            measured,
            s.auto_batch_budget_s,
            since=since,
        )

    async def _load_and_warm_up(self, target: Target) -> tuple:
        """(the new version, when it was loaded, its warmed sizes' batch times)."""
        s, state, since = self.state.settings, self.state, time.monotonic()
        shown = _shown_target(target)
        new = await self.state.on_inference_thread(f"loading {shown}", self._reader(target), since=since)
        if new.max_batch is not None and new.max_batch < state.max_batch_size:
            raise model.ModelLoadError(
                f"it runs batches of at most {new.max_batch}, this server forms {state.max_batch_size}"
            )
        loaded = time.perf_counter()

        def run(fn, *args):
            return self.state.on_inference_thread(f"warming up {shown}", fn, *args, since=since)

        return new, loaded, await warm_up_in_turns(new, state.max_batch_size, s.auto_batch_budget_s, run)

    async def unload(self, name: str) -> None:
        """Stop serving model ``name``: ``/readyz`` and new work 503 until a load; requests in flight finish."""
        self._need()
        async with self._lock:
            current = self.state.segmenter  # what serves once the load before this one is done
            if current is None or current.name != name:
                raise InvalidRequest(f"model '{name}' is not loaded")
            self._check_thread()
            self._retire(await self.state.on_inference_thread("unloading", self._swap, None))
            log.warning(
                "model %s %s unloaded: not ready until a model is loaded", current.name, current.version
            )

    def _check_thread(self) -> None:
        """503 while the inference thread is stuck (a batch, or a load that timed out and
        still runs) or the device is lost: a job queued behind it would never end."""
        problem = self.state.unhealthy()
        if problem is not None:
            raise NotReady(f"the model repository cannot act now: {problem[1]}; the server must be restarted")

    async def reload(self) -> None:
        """``SIGHUP``: load ``MODEL_PATH`` again (a file replaced on disk; for a Triton-layout
        model, the version its policy picks now), swapped in like any load."""
        if self.root is None:
            log.warning("SIGHUP ignored: reloading is off (MODEL_REPOSITORY unset)")
            return
        try:
            target = await asyncio.get_running_loop().run_in_executor(None, self.start_up_target)
            await self.load(target)
        except Exception as exc:  # refused or busy: logged by load, or here
            log.error("SIGHUP reload of %s failed: %s", self.state.settings.model_path, exc)

    def _kept(self) -> str:
        current = self.state.segmenter
        return (
            f"{current.name} {current.version} keeps serving" if current is not None else "nothing is loaded"
        )

    def _shown(self, exc: BaseException) -> str:
        """An error's first line with paths inside the repository relative to it."""
        text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return text.replace(f"{self.root}/", "") if self.root is not None else text

    # -- on the inference thread ------------------------------------------------------

    def _swap(self, new: Optional[ServedModel]) -> Optional[ServedModel]:
        """Between two batches: ``new`` serves every request from now on."""
        old, self.state.segmenter = self.state.segmenter, new
        if new is not None:
            self.state.metrics.set_model(new.name, new.version, str(new.device), new.precision)
            self.state.statistics.of(new.name, new.version)  # listed from now on, at zero until asked
        else:
            self.state.metrics.model_info.info({})
        return old

    def _retire(self, old: Optional[ServedModel]) -> None:
        self._retired = weakref.ref(old) if old is not None else None

    async def _wait_for_retired(self) -> None:
        """At most two versions resident: wait (up to REQUEST_TIMEOUT_S) until the version
        the last swap retired has answered its last request and is freed."""
        deadline = time.monotonic() + self.state.settings.request_timeout_s
        if self._retired is not None and self._retired() is not None:
            thaw_heap()  # the start-up version is in the frozen heap: its cycles too
            try:
                next_collection = 0.0
                while True:
                    # Reference counting frees a version the moment its last request
                    # lets go; a full collection, for one only a cycle holds, stops the
                    # event loop (~0.1 s in a server's thawed heap): one a second at
                    # most, and never more than a tenth of the wait.
                    if time.monotonic() >= next_collection:
                        started = time.monotonic()
                        gc.collect()
                        took = time.monotonic() - started
                        next_collection = started + took + max(COLLECT_EVERY_S, 10 * took)
                    if self._retired() is None:
                        break
                    if time.monotonic() > deadline:
                        raise Conflict("the version the last load replaced still answers requests; retry")
                    await asyncio.sleep(0.05)
            finally:
                freeze_heap()
        self._retired = None
        await self.state.on_inference_thread("releasing memory", release_free_memory)


def _shown_target(target: Target) -> str:
    if isinstance(target, TritonVersion):
        return target.shown
    return target.name if target is not None else "the bundled model"


def load_path(parameters: Dict[str, Any]) -> Optional[str]:
    """The ``path`` parameter of a load (HTTP's body ``parameters``, gRPC's ``parameters``
    map): a file in the repository, or None. Triton's ``config`` (a model config to load
    instead of the repository's) and ``file:<name>`` (model files uploaded with the call)
    are refused: chanseg loads only what is in the repository, and writes nothing there."""
    refused = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
    if refused:
        shown = ", ".join(k[:100] for k in refused[:5])
        raise InvalidRequest(
            f"load parameters {shown}: chanseg does not load a config or files sent with the call; put the model "
            'in the model repository and name it, or one of its files with {"path": "<file in the repository>"}'
        )
    path = parameters.get("path")
    if path is not None and not isinstance(path, str):
        raise InvalidRequest("parameters.path must be a string: a file in the model repository")
    return path
