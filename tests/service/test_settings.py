"""Settings come from CHANSEG_* variables and fail fast on bad values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("CHANSEG_PORT", "9001")
    monkeypatch.setenv("CHANSEG_MAX_BATCH_SIZE", "12")
    monkeypatch.setenv("CHANSEG_DEVICE", "CUDA:1")
    monkeypatch.setenv("CHANSEG_API_KEY", "s3cret")
    monkeypatch.setenv("CHANSEG_LOG_FORMAT", "json")
    s = Settings()
    assert (s.port, s.max_batch_size, s.device, s.log_format) == (9001, 12, "cuda:1", "json")
    assert s.api_key.get_secret_value() == "s3cret" and "s3cret" not in repr(s)


def test_defaults():
    s = Settings()
    assert s.max_batch_size == "auto" and s.model_path is None and s.api_key is None
    assert s.max_images_per_request <= s.max_queue


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CHANSEG_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"CHANSEG_MAX_BATCH_SIZE": "big"}, "max_batch_size"),
        ({"CHANSEG_DEVICE": "tpu"}, "device"),
        ({"CHANSEG_PRECISION": "fp8"}, "precision"),
        ({"CHANSEG_MAX_BATCH_DELAY_MS": "-1"}, "max_batch_delay_ms"),
        ({"CHANSEG_MAX_QUEUE": "4", "CHANSEG_MAX_IMAGES_PER_REQUEST": "8"}, "MAX_IMAGES_PER_REQUEST"),
        (
            {"CHANSEG_MAX_QUEUE": "4", "CHANSEG_MAX_BATCH_SIZE": "8", "CHANSEG_MAX_IMAGES_PER_REQUEST": "2"},
            "MAX_BATCH_SIZE",
        ),
        ({"CHANSEG_PORT": "70000"}, "port"),
    ],
)
def test_bad_values_fail_at_start(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_empty_api_key_means_no_auth(monkeypatch):
    monkeypatch.setenv("CHANSEG_API_KEY", "")
    assert Settings().api_key is None
