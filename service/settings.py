"""Settings: the only place that reads the environment (prefix ``CHANSEG_``).

Bad values fail at start-up with a message naming the variable, never under load.
A default that depends on another setting follows the value the user gave
(``MAX_UPLOAD_BYTES`` follows ``MEMORY_BUDGET_MB``, ``MAX_IMAGES_PER_REQUEST``
follows ``MAX_QUEUE``); only two values set explicitly can conflict, and the
message names both.
"""

from __future__ import annotations

import math
import urllib.parse
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.artifact import FORMATS
from model.devices import DEVICE_HELP, DEVICE_NAMES
from model.precision import PRECISIONS

__all__ = ["Settings", "JSON_PARSE_COST"]

MIB = 1 << 20
# Bytes of memory per byte of a JSON body while it is parsed into numbers, beside the
# body: long data arrays are read by numpy (service.v2_json: text copies, then an int64
# array), measured 4.3 (random pixels) to 6.5 (all zeros, 2 bytes a value) times the body
# for a 1024x1024 image (tracemalloc); the rest goes to orjson as Python objects, at most
# v2_json.MAX_PARSED_VALUES values (~24x, a few MiB at most). 12 was measured for the
# lists every value once became (3.7 flat to 9.7 nested), and is kept: it covers both.
JSON_PARSE_COST = 12
_DEFAULT_BUDGET_MB = 1024
_DEFAULT_UPLOAD = 32 * MIB
_DEFAULT_IMAGES_PER_REQUEST = 16


class Settings(BaseSettings):
    """Server settings; each field is read from ``CHANSEG_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CHANSEG_", frozen=True, extra="ignore")

    model_path: Optional[Path] = Field(None, description="TorchScript artifact; unset: the bundled model")
    device: str = Field("auto", description=DEVICE_HELP)
    precision: Literal[("auto", *PRECISIONS)] = Field(  # model.PRECISIONS: the names are defined there
        "auto",
        description="auto: what `python -m model compile` chose for this machine (the fastest within "
        "0.005 held-out mIoU of fp32), else fp32",
    )
    model_format: Literal[("auto", *FORMATS)] = Field(  # model.artifact.FORMATS: the names are defined there
        "auto",
        description="auto: the bundled model's compiled package for this machine when there is one, "
        "else TorchScript; package: compile it into the cache when missing",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: Optional[int] = Field(
        None,
        ge=1,
        le=65535,
        description="the Open Inference Protocol over gRPC on this port (the grpc extra); unset: off",
    )
    max_batch_size: Union[Literal["auto"], PositiveInt] = Field(
        "auto", description="'auto': measured at warm-up on the device; or a number"
    )
    max_batch_delay_ms: float = Field(5.0, ge=0, le=10_000)
    max_queue: PositiveInt = Field(64, description="images waiting for inference, all requests together")
    request_timeout_s: float = Field(30.0, gt=0)
    memory_budget_mb: PositiveInt = Field(
        _DEFAULT_BUDGET_MB,
        description="memory that requests in flight may hold together (bodies, decoding, outputs), "
        "on top of the loaded model: 1/4 for bodies, 3/4 for decoding and outputs",
    )
    max_upload_bytes: PositiveInt = Field(
        _DEFAULT_UPLOAD, description="request body limit; default 32 MiB, or half the body budget if less"
    )
    max_json_bytes: PositiveInt = Field(
        32 * MIB,
        description="JSON body limit (v2 JSON tensors; parsing costs ~12x the bytes): "
        "default 32 MiB (a 1024x1024 RGB image as JSON is 11-17 MB), or less where the budget "
        "or MAX_UPLOAD_BYTES is smaller",
    )
    max_image_pixels: PositiveInt = Field(64_000_000, description="per image, from its header")
    max_request_pixels: PositiveInt = Field(640_000_000, description="all images of one request together")
    min_image_side: PositiveInt = Field(8, description="images smaller than this on a side are refused")
    max_images_per_request: PositiveInt = Field(
        _DEFAULT_IMAGES_PER_REQUEST, description="default 16, or MAX_QUEUE if less"
    )
    read_timeout_s: PositiveFloat = Field(
        60.0, description="a request's headers and body must arrive within this (else 408)"
    )
    max_connections: PositiveInt = Field(256, description="open connections; beyond, 503 and close")
    watchdog_s: Union[Literal["auto"], PositiveFloat] = Field(
        "auto",
        description="liveness fails when one batch runs longer than this; "
        "auto: 20x the longest batch measured at warm-up, at least 10 s",
    )
    load_timeout_s: PositiveFloat = Field(
        300.0,
        description="a model load and its warm-up (start-up's, or through the repository) must finish within "
        "this: beyond, the load fails, and liveness fails while the inference thread is still in it",
    )
    num_threads: Optional[PositiveInt] = Field(
        None, description="torch intra-op threads; unset: torch's default"
    )
    inference_streams: Union[Literal["auto"], PositiveInt] = Field(
        "auto",
        description="most batches running at once while requests overlap, each with its share of torch's "
        "threads (a batch with nothing behind it, after one nothing came during, runs alone, with all of "
        "them); auto: 2 on a CPU with 2 torch threads, else 1 (CUDA: always 1)",
    )
    io_threads: Union[Literal["auto"], PositiveInt] = Field(
        "auto",
        description="decoding/encoding threads; auto: the CPUs this process may use "
        "(affinity mask and container CPU quota) + 2, at most 64",
    )
    api_key: Optional[SecretStr] = Field(
        None, description="the key inference and metadata calls must carry (HTTP and gRPC); unset: no auth"
    )
    admin_api_key: Optional[SecretStr] = Field(
        None,
        description="the key the model repository's routes (load, unload, index) must carry instead of API_KEY; "
        "unset: they take API_KEY (a warning at start-up when MODEL_REPOSITORY is set)",
    )
    admin_origins: str = Field(
        "",
        description="comma-separated origins (https://console.example.com) whose web pages may call the "
        "repository's routes; a browser's request from any other origin is refused (403), except the server's "
        "own when it is reached by an IP address or localhost (a DNS name could be rebound)",
    )
    model_repository: Optional[Path] = Field(
        None,
        description="a folder of artifacts the server may load at run time (v2 model-repository extension, "
        "SIGHUP re-reads MODEL_PATH), nothing outside it; unset: reloading is off",
    )
    cache_dir: Optional[Path] = Field(
        None,
        description="where the bundled model is compiled and cached and batch-size measurements are kept; "
        "unset: ~/.cache/chanseg (when it is read-only, this user's private $TMPDIR/chanseg-cache-<uid>)",
    )
    tracing: bool = Field(
        False,
        description="OpenTelemetry traces (the tracing extra), exported as the standard OTEL_* variables say "
        "(OTLP over HTTP by default)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = "text"
    drain_timeout_s: float = Field(
        25.0, ge=0, description="shutdown budget: from SIGTERM to exit, at most this (plus ~1 s to exit)"
    )
    auto_batch_limit: PositiveInt = Field(32, description="largest batch size 'auto' tries")
    auto_batch_budget_s: PositiveFloat = Field(
        10.0, description="longest 'auto' spends measuring batch sizes (it stops sooner once the curve peaks)"
    )
    remeasure_batch_size: bool = Field(
        False, description="measure 'auto' afresh instead of reusing the measurement kept in the cache"
    )

    @field_validator("model_repository")
    @classmethod
    def _repository(cls, value: Optional[Path]) -> Optional[Path]:
        if value is not None and not value.is_dir():
            raise ValueError(f"{value} is not a folder")
        return value.resolve() if value is not None else None

    @field_validator("admin_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in filter(None, (o.strip() for o in value.split(","))):
            parsed = urllib.parse.urlsplit(origin.rstrip("/"))
            if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path or parsed.query:
                raise ValueError(
                    f"{origin!r} is not an origin (scheme://host[:port], e.g. https://console.example.com)"
                )
        return value

    @property
    def admin_origin_set(self) -> frozenset:
        """ADMIN_ORIGINS as a set, each lower-cased and without a trailing slash."""
        return frozenset(o.strip().lower().rstrip("/") for o in self.admin_origins.split(",") if o.strip())

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_NAMES.fullmatch(value):
            raise ValueError(f"must be {DEVICE_HELP}")
        return value

    @field_validator("log_level", "log_format", "precision", "device", "model_format", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key", "admin_api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        return None if value == "" else value

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        """Defaults that follow what the user set (before validation: raw values).

        Each default that could conflict with a value the user gave yields to it:
        MAX_QUEUE grows to a numeric MAX_BATCH_SIZE, MAX_REQUEST_PIXELS to
        MAX_IMAGE_PIXELS, MEMORY_BUDGET_MB to what MAX_UPLOAD_BYTES and
        MAX_JSON_BYTES need; MAX_UPLOAD_BYTES and MAX_JSON_BYTES shrink to the
        budget, MAX_IMAGES_PER_REQUEST to MAX_QUEUE."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = {k for k, v in data.items() if v not in (None, "")}

        def number(name: str) -> Optional[float]:
            try:
                return float(data[name]) if name in given else None
            except (TypeError, ValueError):
                return None  # the field's own validator names the bad value

        batch, pixels = number("max_batch_size"), number("max_image_pixels")
        upload, json_bytes = number("max_upload_bytes"), number("max_json_bytes")
        if "max_queue" not in given and batch is not None:
            data["max_queue"] = max(64, int(batch))
        if "max_request_pixels" not in given and pixels is not None:
            data["max_request_pixels"] = max(640_000_000, int(pixels))
        if "memory_budget_mb" not in given:
            needed = [_DEFAULT_BUDGET_MB]
            if upload is not None:  # bodies get 1/4 of the budget, each held twice
                needed.append(math.ceil(8 * upload / MIB))
            if json_bytes is not None:  # parsing gets 3/4, at JSON_PARSE_COST per byte
                needed.append(math.ceil(JSON_PARSE_COST * json_bytes * 4 / 3 / MIB))
            data["memory_budget_mb"] = max(needed)
        budget, queue = number("memory_budget_mb"), number("max_queue")
        if budget is None or queue is None:
            budget, queue = float(data["memory_budget_mb"]), float(data.get("max_queue") or 64)
        if "max_upload_bytes" not in given:
            upload = max(json_bytes or 1, min(_DEFAULT_UPLOAD, budget * MIB // 8))
            data["max_upload_bytes"] = int(upload)
        if "max_json_bytes" not in given:
            work = budget * MIB - budget * MIB // 4
            data["max_json_bytes"] = int(
                max(1, min(32 * MIB, work // JSON_PARSE_COST, float(data["max_upload_bytes"])))
            )
        if "max_images_per_request" not in given:
            data["max_images_per_request"] = max(1, min(_DEFAULT_IMAGES_PER_REQUEST, int(queue)))
        return data

    # -- the budget's two ledgers, derived from MEMORY_BUDGET_MB ---------------

    @property
    def body_budget_bytes(self) -> int:
        """Request bodies in flight (each held as up to twice its size while read)."""
        return self.memory_budget_mb * MIB // 4

    @property
    def work_budget_bytes(self) -> int:
        """Decoding, v2 parsing and outputs in flight."""
        return self.memory_budget_mb * MIB - self.body_budget_bytes

    @property
    def max_output_bytes(self) -> int:
        """The most one v2 response may hold (a quarter of the work budget)."""
        return self.work_budget_bytes // 4

    @model_validator(mode="after")
    def _images_fit_queue(self) -> "Settings":
        if 2 * self.max_upload_bytes > self.body_budget_bytes:
            raise ValueError(
                f"MAX_UPLOAD_BYTES ({self.max_upload_bytes}) must be at most 1/8 of MEMORY_BUDGET_MB "
                f"({self.memory_budget_mb} MiB): a body is held twice while read, and bodies get 1/4"
            )
        if JSON_PARSE_COST * self.max_json_bytes > self.work_budget_bytes:
            raise ValueError(
                f"MAX_JSON_BYTES ({self.max_json_bytes}) needs {JSON_PARSE_COST}x its size to parse, "
                f"more than the 3/4 of MEMORY_BUDGET_MB ({self.memory_budget_mb} MiB) decoding may use"
            )
        if self.max_json_bytes > self.max_upload_bytes:
            raise ValueError(
                f"MAX_JSON_BYTES ({self.max_json_bytes}) must be at most MAX_UPLOAD_BYTES ({self.max_upload_bytes})"
            )
        if self.max_image_pixels > self.max_request_pixels:
            raise ValueError(
                f"MAX_IMAGE_PIXELS ({self.max_image_pixels}) must be at most MAX_REQUEST_PIXELS "
                f"({self.max_request_pixels})"
            )
        if self.max_images_per_request > self.max_queue:
            raise ValueError(
                f"MAX_IMAGES_PER_REQUEST ({self.max_images_per_request}) must be at most MAX_QUEUE ({self.max_queue})"
            )
        if isinstance(self.max_batch_size, int) and self.max_batch_size > self.max_queue:
            raise ValueError(
                f"MAX_BATCH_SIZE ({self.max_batch_size}) must be at most MAX_QUEUE ({self.max_queue})"
            )
        return self
