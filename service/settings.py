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

    model_path: Optional[Path] = Field(
        None,
        description="TorchScript artifact (`python -m model export` makes one) or compiled package, or a "
        "Triton-layout model's folder (or, inside MODEL_REPOSITORY, a version's folder or file); unset: the "
        "bundled model, or the repository's only Triton-layout model",
    )
    device: str = Field("auto", description=f"{DEVICE_HELP}; auto: cuda if available, else cpu")
    precision: Literal[("auto", *PRECISIONS)] = Field(  # model.PRECISIONS: the names are defined there
        "auto",
        description="auto: what `python -m model compile` chose for this machine (the fastest within "
        "0.005 held-out mIoU of fp32), fp32 when nothing was compiled; or fp32, fp16, bf16 (refused, with a "
        "message, where the hardware lacks it)",
    )
    model_format: Literal[("auto", *FORMATS)] = Field(  # model.artifact.FORMATS: the names are defined there
        "auto",
        description="auto: the bundled model's compiled package for this machine when there is one, "
        "else TorchScript; torchscript; package: compile it into the cache when missing (minutes)",
    )
    host: str = Field("127.0.0.1", description="listen address (the Docker image sets 0.0.0.0)")
    port: int = Field(8000, ge=0, le=65535, description="listen port for HTTP")
    grpc_port: Optional[int] = Field(
        None,
        ge=1,
        le=65535,
        description="the Open Inference Protocol over gRPC on this port (the grpc extra; the Docker image "
        "sets 8001, as Triton's); unset: no gRPC",
    )
    max_batch_size: Union[Literal["auto"], PositiveInt] = Field(
        "auto",
        description="auto: measured on the device at the first start (the smallest batch within 10% of the "
        "best images/s, up to AUTO_BATCH_LIMIT), kept in the cache and reused; or a number",
    )
    max_batch_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="longest the first image of a batch waits for company"
    )
    max_queue: PositiveInt = Field(
        64,
        description="images waiting or being decoded, all requests together; beyond it new requests get 503 "
        "at once, before their body is read; default 64, or a larger numeric MAX_BATCH_SIZE",
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="per-request deadline; expired images are dropped before compute, the client gets 504",
    )
    memory_budget_mb: PositiveInt = Field(
        _DEFAULT_BUDGET_MB,
        description="memory that requests in flight may hold together (bodies, decoding, outputs), "
        "on top of the loaded model: 1/4 for bodies, 3/4 for decoding, v2 parsing and outputs; default 1024, "
        "or what a larger MAX_UPLOAD_BYTES or MAX_JSON_BYTES needs",
    )
    max_upload_bytes: PositiveInt = Field(
        _DEFAULT_UPLOAD,
        description="request body limit, enforced while reading; default 32 MiB, or 1/8 of the budget "
        "(half the bodies' share) if less",
    )
    max_json_bytes: PositiveInt = Field(
        32 * MIB,
        description="JSON body limit (v2 JSON tensors; parsing costs ~12x the bytes): "
        "default 32 MiB (a 1024x1024 RGB image as JSON is 11-17 MB), or less where the budget "
        "or MAX_UPLOAD_BYTES is smaller",
    )
    max_image_pixels: PositiveInt = Field(
        64_000_000,
        description="per image, checked from its header before decoding (a 48 Mpx phone photo fits)",
    )
    max_request_pixels: PositiveInt = Field(
        640_000_000,
        description="all images of one request together; default 640000000, or a larger MAX_IMAGE_PIXELS",
    )
    min_image_side: PositiveInt = Field(8, description="images smaller than this on a side are refused (400)")
    max_images_per_request: PositiveInt = Field(
        _DEFAULT_IMAGES_PER_REQUEST, description="images in one request; default 16, or MAX_QUEUE if less"
    )
    read_timeout_s: PositiveFloat = Field(
        60.0,
        description="a request's headers and body must arrive within this of its first byte (else 408); a "
        "client that reads none of its response for this long is disconnected",
    )
    max_connections: PositiveInt = Field(
        256,
        description="open connections; requests on more get 503 with Retry-After, and the connection is closed",
    )
    watchdog_s: Union[Literal["auto"], PositiveFloat] = Field(
        "auto",
        description="liveness fails when one batch runs longer than this; "
        "auto: 20x the longest batch measured at warm-up, at least 10 s",
    )
    load_timeout_s: PositiveFloat = Field(
        300.0,
        description="a model load and its warm-up (start-up's, or through the repository) must finish within "
        "this: a start-up past it stops the process (`python -m service` and `chanseg serve` exit at once; "
        "under a bare `uvicorn service.app:app` the interpreter waits for the thread, so use those), a "
        "repository load past it answers 504, and liveness fails while the inference thread is still in it "
        "(further loads and unloads: 503)",
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
        None,
        description="the key inference and metadata calls must carry: `Authorization: Bearer KEY` or "
        "`X-API-Key: KEY` (gRPC: the same metadata); unset: no auth. These stay open: `/healthz`, `/readyz`, "
        "`/metrics`, `/v2`, `/v2/`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}/ready`, "
        "`/v2/models/{name}/versions/{version}/ready`, `/docs`, `/docs/oauth2-redirect`, `/docs/assets/{name}`, "
        "`/redoc`, `/openapi.json`, `/` (probes, scrapes, the API's own description and the page; none carries "
        "a secret); over gRPC ServerLive, ServerReady, ServerMetadata (they read no message; ModelReady reads "
        "one, so it takes the key)",
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
        description="a folder of artifacts, or of models in Triton's layout, the server may load at run time "
        "(the v2 model-repository extension), nothing outside it; also turns on SIGHUP (load MODEL_PATH "
        "again); unset: reloading is off",
    )
    cache_dir: Optional[Path] = Field(
        None,
        description="where the bundled weights are compiled to TorchScript and batch-size measurements are "
        "kept (the server passes it to the model package: `model.load(cache_dir=...)`; `python -m model` reads "
        "CHANSEG_CACHE_DIR itself); unset: ~/.cache/chanseg. When it is read-only (the image's): this user's "
        "private $TMPDIR/chanseg-cache-<uid> (0700; one that exists is used only when it is the user's own "
        "and no one else may write it)",
    )
    tracing: bool = Field(
        False,
        description="OpenTelemetry traces (the tracing extra), exported as the standard OTEL_* variables say "
        "(OTLP over HTTP by default)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="the server's log level"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="json: one object per line; either way one access line per request with its id, status, "
        "images and queue/inference/total ms",
    )
    drain_timeout_s: float = Field(
        25.0,
        ge=0,
        description="the shutdown budget: from SIGTERM to exit at most this (+ ~1.5 s for the interpreter to "
        "exit); /readyz and new work get 503 at once, accepted work finishes within it; exit 0 when all of it "
        "did, 1 when the budget ran out",
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
