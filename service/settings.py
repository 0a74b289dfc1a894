"""Settings: the only place that reads the environment (prefix ``CHANSEG_``).

Bad values fail at start-up with a message naming the variable, never under load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, PositiveInt, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Server settings; each field is read from ``CHANSEG_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CHANSEG_", frozen=True, extra="ignore")

    model_path: Optional[Path] = Field(None, description="TorchScript artifact; unset: the bundled model")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_size: Union[Literal["auto"], PositiveInt] = Field(
        "auto", description="'auto': measured at warm-up on the device; or a number"
    )
    max_batch_delay_ms: float = Field(5.0, ge=0, le=10_000)
    max_queue: PositiveInt = Field(64, description="images waiting for inference, all requests together")
    request_timeout_s: float = Field(30.0, gt=0)
    max_upload_bytes: PositiveInt = 32 * 1024 * 1024
    max_image_pixels: PositiveInt = 40_000_000
    min_image_side: PositiveInt = Field(8, description="images smaller than this on a side are refused")
    max_images_per_request: PositiveInt = 16
    num_threads: Optional[PositiveInt] = Field(
        None, description="torch intra-op threads; unset: torch's default"
    )
    api_key: Optional[SecretStr] = None
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = "text"
    drain_timeout_s: float = Field(25.0, ge=0, description="SIGTERM: longest wait for accepted work")
    auto_batch_limit: PositiveInt = Field(32, description="largest batch size 'auto' tries")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("log_level", "log_format", "precision", "device", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        return None if value == "" else value

    @model_validator(mode="after")
    def _images_fit_queue(self) -> "Settings":
        if self.max_images_per_request > self.max_queue:
            raise ValueError(
                f"MAX_IMAGES_PER_REQUEST ({self.max_images_per_request}) must be at most MAX_QUEUE ({self.max_queue})"
            )
        if isinstance(self.max_batch_size, int) and self.max_batch_size > self.max_queue:
            raise ValueError(
                f"MAX_BATCH_SIZE ({self.max_batch_size}) must be at most MAX_QUEUE ({self.max_queue})"
            )
        return self
