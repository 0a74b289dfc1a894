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


@pytest.mark.parametrize(
    "env, follows",
    [
        ({"CHANSEG_MAX_UPLOAD_BYTES": str(256 * 2**20)}, {"memory_budget_mb": 2048}),
        ({"CHANSEG_MAX_BATCH_SIZE": "128"}, {"max_queue": 128}),
        ({"CHANSEG_MAX_IMAGE_PIXELS": "1000000000"}, {"max_request_pixels": 1_000_000_000}),
        ({"CHANSEG_MAX_JSON_BYTES": str(40 * 2**20)}, {"max_upload_bytes": 40 * 2**20}),
        ({"CHANSEG_MAX_QUEUE": "4"}, {"max_images_per_request": 4}),
    ],
)
def test_one_value_set_alone_never_stops_the_server(monkeypatch, env, follows):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert {name: getattr(s, name) for name in follows} == follows


def test_defaults_follow_what_the_user_set(monkeypatch):
    """A default that would conflict with a value the user chose follows it."""
    monkeypatch.setenv("CHANSEG_MAX_QUEUE", "8")
    monkeypatch.setenv("CHANSEG_MEMORY_BUDGET_MB", "64")
    s = Settings()
    assert s.max_images_per_request == 8  # not the default 16, which would not fit the queue
    assert s.max_upload_bytes == 8 * 2**20  # 1/8 of the budget, not 32 MiB
    assert s.max_json_bytes <= s.max_upload_bytes and 12 * s.max_json_bytes <= s.work_budget_bytes
    assert s.body_budget_bytes + s.work_budget_bytes == 64 * 2**20


@pytest.mark.parametrize(
    "env, names",
    [
        (
            {"CHANSEG_MEMORY_BUDGET_MB": "64", "CHANSEG_MAX_UPLOAD_BYTES": "33554432"},
            ["MAX_UPLOAD_BYTES", "MEMORY_BUDGET_MB"],
        ),
        (
            {"CHANSEG_MEMORY_BUDGET_MB": "64", "CHANSEG_MAX_JSON_BYTES": "8388608"},
            ["MAX_JSON_BYTES", "MEMORY_BUDGET_MB"],
        ),
        (
            {"CHANSEG_MAX_IMAGE_PIXELS": "100", "CHANSEG_MAX_REQUEST_PIXELS": "10"},
            ["MAX_IMAGE_PIXELS", "MAX_REQUEST_PIXELS"],
        ),
    ],
)
def test_two_explicit_values_that_conflict_are_both_named(monkeypatch, env, names):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert all(name in str(raised.value) for name in names)
