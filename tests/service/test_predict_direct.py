"""POST /predict's direct path (routes/predict.Direct): the same answers as the FastAPI route,
and the route still takes what FastAPI must validate."""

from __future__ import annotations

import pytest

from service.routes.predict import Direct, plain_query
from testbed.metrics import metric_samples
from tests.service.conftest import make_settings, png_bytes, random_image, serve

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "query,expected",
    [
        (b"", {"format": None, "confidence": False}),
        (b"format=png", {"format": "png", "confidence": False}),
        (b"format=rle&confidence=TRUE&other=1", {"format": "rle", "confidence": True}),
        (b"confidence=off", {"format": None, "confidence": False}),
        (b"format=gif", None),
        (b"format=", None),
        (b"confidence=maybe", None),
        (b"format=png&format=json", None),
    ],
)
def test_plain_query(query, expected):
    assert plain_query(query) == expected


async def test_only_a_plain_post_to_predict_goes_direct():
    """Anything else reaches the app behind it (FastAPI's routing, validation and 405s)."""
    passed = []

    async def behind(scope, receive, send):
        passed.append((scope["method"], scope["path"], scope["query_string"]))

    direct = Direct(behind)
    for method, path, query in [
        ("GET", "/predict", b""),
        ("POST", "/predict/", b""),
        ("POST", "/v2/models/x/infer", b""),
        ("POST", "/predict", b"format=gif"),
        ("POST", "/predict", b"confidence=2"),
    ]:
        await direct({"type": "http", "method": method, "path": path, "query_string": query}, None, None)
    assert len(passed) == 5


def _same(response) -> tuple:
    body = response.json() if response.headers["content-type"] == "application/json" else response.content
    if isinstance(body, dict):
        body.pop("request_id", None)
    return response.status_code, body, response.headers.get("www-authenticate")


async def test_direct_and_route_answer_alike(tiny_artifact):
    """Each request once through the direct path and once through the route (a repeated
    parameter sends it there): the same status, body and headers that matter."""
    image = png_bytes(random_image(3, 40, 30))
    raw = {"content": image, "headers": {"content-type": "image/png", "x-api-key": "k"}}
    cases = {
        "json": ("format=json", raw),
        "png": ("format=png", raw),
        "no key": ("format=json", {"content": image, "headers": {"content-type": "image/png"}}),
        "bad image": ("format=json", {"content": b"nope", "headers": {"content-type": "image/png", "x-api-key": "k"}}),
        "text field": ("format=json", {"data": {"file": "x"}, "files": [("y", ("y", b"1"))], "headers": {"x-api-key": "k"}}),
        "two images as png": ("format=png", {"files": [("file", ("a", image)), ("file", ("b", image))], "headers": {"x-api-key": "k"}}),
    }  # fmt: skip
    async with serve(make_settings(tiny_artifact, api_key="k")) as client:
        for name, (query, kwargs) in cases.items():
            direct = await client.post(f"/predict?{query}", **kwargs)
            routed = await client.post(f"/predict?{query}&{query}", **kwargs)
            assert _same(direct) == _same(routed), name
        metrics = metric_samples((await client.get("/metrics")).text)
    assert metrics[("chanseg_requests_total", (("endpoint", "predict"), ("status", "200")))] == 4


async def test_the_route_still_validates_what_direct_leaves_to_it(tiny_artifact):
    async with serve(make_settings(tiny_artifact)) as client:
        r = await client.post(
            "/predict?confidence=maybe", content=b"x", headers={"content-type": "image/png"}
        )
    assert r.status_code == 422 and "confidence" in r.json()["detail"]
