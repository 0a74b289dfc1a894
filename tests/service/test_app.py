"""The HTTP contract, in-process (httpx ASGITransport with the app's lifespan)."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import re

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from testbed.metrics import metric_samples
from tests.service.conftest import decode_mask, make_settings, png_bytes, random_image, serve, tracked_by_gc

pytestmark = pytest.mark.anyio

DESIGN_METRICS = {
    "chanseg_requests": "counter",
    "chanseg_request_duration_seconds": "histogram",
    "chanseg_images": "counter",
    "chanseg_queue_wait_seconds": "histogram",
    "chanseg_inference_duration_seconds": "histogram",
    "chanseg_batch_size": "histogram",
    "chanseg_queue_depth": "gauge",
    "chanseg_preprocess_duration_seconds": "histogram",
    "chanseg_postprocess_duration_seconds": "histogram",
    "chanseg_model_info": "gauge",  # an Info metric, exposed as a gauge of 1
}


def files(*arrays, names=None):
    names = names or [f"img{i}.png" for i in range(len(arrays))]
    return [("file", (n, png_bytes(a), "image/png")) for n, a in zip(names, arrays)]


async def test_predict_multipart_json(tiny_artifact, tiny_segmenter):
    images = [random_image(1, 48, 40), random_image(2, 100, 70)]
    async with serve(make_settings(tiny_artifact)) as client:
        r = await client.post("/predict", files=files(*images, names=["a.png", "b.png"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "tiny", "version": "7"}
    preds = body["predictions"]
    assert [(p["filename"], p["width"], p["height"]) for p in preds] == [
        ("a.png", 40, 48),
        ("b.png", 70, 100),
    ]
    for p, image in zip(preds, images):
        mask = decode_mask(base64.b64decode(p["mask_png"]))
        np.testing.assert_array_equal(mask, tiny_segmenter.predict(image))
        assert set(p["class_fractions"]) == {"background", "circle", "rectangle", "triangle"}
        assert abs(sum(p["class_fractions"].values()) - 1) < 1e-9
        counts = np.bincount(mask.ravel(), minlength=4) / mask.size
        assert p["class_fractions"]["circle"] == pytest.approx(counts[1])
    for header in ("x-request-id", "x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms"):
        assert header in r.headers


async def test_raw_body_and_png_responses(tiny_artifact, tiny_segmenter):
    image = random_image(3, 33, 65)
    expected = tiny_segmenter.predict(image)
    async with serve(make_settings(tiny_artifact)) as client:
        raw = await client.post("/predict", content=png_bytes(image), headers={"content-type": "image/png"})
        by_accept = await client.post(
            "/predict", content=png_bytes(image), headers={"content-type": "image/png", "accept": "image/png"}
        )
        by_query = await client.post("/predict?format=png", files=files(image))
        two_as_png = await client.post("/predict?format=png", files=files(image, image))
    assert raw.status_code == 200 and raw.json()["predictions"][0]["filename"] == "image"
    for r in (by_accept, by_query):
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(decode_mask(r.content), expected)
    assert two_as_png.status_code == 400 and "one" in two_as_png.json()["detail"]


async def test_a_png_response_skips_what_only_json_carries(tiny_artifact, monkeypatch):
    """Pixels per class and connected regions are computed for JSON responses only."""
    from model.predictor import Segmenter
    from service import pipeline

    calls = []
    counts, regions = Segmenter.class_counts, pipeline.regions
    counted = staticmethod(lambda *a: calls.append("counts") or counts(*a))
    monkeypatch.setattr(Segmenter, "class_counts", counted)
    monkeypatch.setattr(pipeline, "regions", lambda *a: calls.append("regions") or regions(*a))
    image = png_bytes(random_image(4, 40, 30))
    async with serve(make_settings(tiny_artifact)) as client:
        headers = {"content-type": "image/png"}
        as_png = await client.post("/predict", content=image, headers={**headers, "accept": "image/png"})
        png_calls, calls[:] = list(calls), []
        as_json = await client.post("/predict", content=image, headers=headers)
    assert as_png.status_code == 200 and as_png.headers["content-type"] == "image/png"
    assert png_calls == []
    assert as_json.status_code == 200 and sorted(calls) == ["counts", "regions"]
    assert sum(as_json.json()["predictions"][0]["class_pixels"].values()) == 40 * 30


@pytest.fixture
def pool_jobs(monkeypatch):
    """The names of the jobs requests hand the I/O pool, in order."""
    from service.iopool import IOPool

    jobs = []
    call = IOPool.call
    monkeypatch.setattr(
        IOPool, "call", lambda self, fn, *args: jobs.append(fn.__name__) or call(self, fn, *args)
    )
    return jobs


async def test_one_image_is_probed_and_decoded_in_one_job_within_a_reservation_of_its_cost(
    tiny_artifact, tiny_segmenter, monkeypatch, pool_jobs
):
    """A request of one image takes DECODE_AHEAD from the work ledger if it is free at once,
    and its image is probed and decoded in one I/O job when the probe finds its decoding
    costs no more, and an I/O thread is idle to take it (else the reservation would wait in
    the queue). A larger image, the images of a request of several, and an image that finds
    the ledger full or no thread idle go as before: probe, reserve the image's cost, decode. Every
    decoding runs with at least its cost reserved, and every answer is the mask it was."""
    from service import pipeline
    from service.iopool import IOPool

    jobs, decoded = pool_jobs, []
    prepare = pipeline.prepare_probed

    def recording(probed, target):
        decoded.append((probed.cost, budget.in_use))
        return prepare(probed, target)

    monkeypatch.setattr(pipeline, "prepare_probed", recording)
    small = random_image(5, 64, 80)
    large = np.zeros((2100, 2100, 3), np.uint8)
    large[:, 700:1400], large[1050:] = 120, 250  # costs more than DECODE_AHEAD to decode (PIL, full size)
    answers, seen = [], []
    async with serve(make_settings(tiny_artifact)) as client:
        budget = client.app.state.chanseg.work_budget
        for images in ([small], [large], [small, small]):
            jobs.clear()
            answers.append((images, await client.post("/predict", files=files(*images))))
            seen.append([job for job in jobs if job != "encode"])
        held = await budget.reserve(budget.capacity)  # the ledger is full when the next one comes
        jobs.clear()
        waiting = asyncio.create_task(client.post("/predict", files=files(small)))
        while "probe" not in jobs:
            await asyncio.sleep(0.01)
        held.release()
        answers.append(([small], await waiting))
        seen.append([job for job in jobs if job != "encode"])
        with monkeypatch.context() as busy:
            busy.setattr(IOPool, "idle", property(lambda self: 0))
            jobs.clear()
            answers.append(([small], await client.post("/predict", files=files(small))))
            seen.append([job for job in jobs if job != "encode"])
        assert budget.in_use == 0
    assert seen == [["probe_and_prepare"], ["probe_and_prepare", "prepare"], ["probe"] * 2 + ["prepare"] * 2,
                    ["probe", "prepare"], ["probe", "prepare"]]  # fmt: skip
    assert decoded[1][0] > pipeline.DECODE_AHEAD >= decoded[0][0]
    assert len(decoded) == 6 and all(reserved >= cost for cost, reserved in decoded), decoded
    for images, r in answers:
        assert r.status_code == 200, r.text
        for image, prediction in zip(images, r.json()["predictions"]):
            mask = decode_mask(base64.b64decode(prediction["mask_png"]))
            np.testing.assert_array_equal(mask, tiny_segmenter.predict(image))


async def test_a_small_png_answer_is_encoded_on_the_event_loop(tiny_artifact, tiny_segmenter, pool_jobs):
    """An answer that is one PNG (the mask, or the confidence map) of at most
    INLINE_PNG_PIXELS is encoded on the event loop: its request hands the I/O pool its
    probe and decode only (one job). A larger one, one from labels larger than that (a model whose
    input is 512x512), an RLE and a JSON answer (whose regions can take milliseconds)
    still go to the pool, and every answer is the mask it was."""
    from service.pipeline import INLINE_PNG_PIXELS
    from tests.service.fake_model import FakeModel

    jobs = pool_jobs
    at_limit, over, flat = random_image(8, 256, 256), random_image(9, 257, 256), random_image(11, 8, 8192)
    assert at_limit.shape[0] * at_limit.shape[1] == INLINE_PNG_PIXELS < over.shape[0] * over.shape[1]
    asked = [
        ("png", at_limit), ("confidence", at_limit), ("png", flat),
        ("png", over), ("rle", at_limit), ("json", at_limit),
    ]  # fmt: skip
    answers, seen = [], []
    async with serve(make_settings(tiny_artifact)) as client:
        for fmt, image in asked:
            jobs.clear()
            answers.append(await client.post(f"/predict?format={fmt}", files=files(image)))
            seen.append(list(jobs))
    small = np.zeros((64, 48, 3), np.uint8)
    small[21:42], small[42:] = 128, 255  # the fake model's classes 0, 1, 2 by rows
    fake = FakeModel(input_size=(512, 512))
    async with serve(make_settings(tiny_artifact), segmenter=fake) as client:
        jobs.clear()
        from_large = await client.post("/predict?format=png", files=files(small))
    assert from_large.status_code == 200, from_large.text
    assert jobs == ["probe_and_prepare", "encode"]
    bands = np.repeat(np.array([0] * 21 + [1] * 21 + [2] * 22, np.uint8)[:, None], 48, 1)
    assert (decode_mask(from_large.content) == bands).mean() > 0.95
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert seen == [["probe_and_prepare"]] * 3 + [["probe_and_prepare", "encode"]] * 3
    for r, (fmt, image) in zip(answers, asked):
        if fmt == "png":
            np.testing.assert_array_equal(decode_mask(r.content), tiny_segmenter.predict(image))
        elif fmt == "json":
            mask = decode_mask(base64.b64decode(r.json()["predictions"][0]["mask_png"]))
            np.testing.assert_array_equal(mask, tiny_segmenter.predict(image))
    expected = np.rint(tiny_segmenter.predict_proba(at_limit).max(0) * 255)
    np.testing.assert_allclose(np.asarray(Image.open(io.BytesIO(answers[1].content))), expected, atol=1)


async def test_an_rle_answer_reserves_for_its_runs(tmp_path, monkeypatch):
    """A wide image of stripes one pixel high has a run per pixel read column by column, as
    RLE reads it: its RLE needs ~200 MiB where its PNG needs ~7, and a server with 96 MiB for
    its work refuses it (413, with what it needs) while it answers the same image's PNG, and
    the RLE of an image of three bands (3 runs a column)."""
    from tests.service.fake_model import FakeModel

    mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools is in the dev extra")
    monkeypatch.setenv("CHANSEG_CACHE_DIR", str(tmp_path))
    stripes = np.zeros((32, 100_000, 3), np.uint8)
    stripes[1::2] = 255  # dark and light rows: the fake model's classes 0 and 2
    bands = np.zeros((30, 100_000, 3), np.uint8)
    bands[10:20], bands[20:] = 128, 255
    settings = Settings(device="cpu", max_batch_size=2, log_level="warning", memory_budget_mb=128)
    async with serve(settings, segmenter=FakeModel()) as client:
        send = [("file", ("stripes.png", png_bytes(stripes), "image/png"))]
        as_rle = await client.post("/predict?format=rle", files=send)
        as_png = await client.post("/predict?format=png", files=send)
        banded = await client.post(
            "/predict?format=rle", files=[("file", ("bands.png", png_bytes(bands), "image/png"))]
        )
    assert as_rle.status_code == 413, as_rle.text
    assert re.search(r"the mask of stripes\.png needs \d+ MiB", as_rle.json()["detail"]), as_rle.text
    assert as_png.status_code == 200 and decode_mask(as_png.content)[:4, 0].tolist() == [0, 2, 0, 2]
    assert banded.status_code == 200, banded.text
    rles = banded.json()["predictions"][0]["mask_rle"]
    assert set(rles) == {"dark", "mid", "light"}
    for c, name in enumerate(("dark", "mid", "light")):
        mask = mask_api.decode({"size": rles[name]["size"], "counts": rles[name]["counts"].encode()})
        assert mask.shape == (30, 100_000) and mask[c * 10 : c * 10 + 10].all() and mask.sum() == 10 * 100_000


async def test_a_large_rotated_jpeg_gets_its_mask_at_its_own_size(tiny_artifact, tiny_segmenter):
    """A phone photo (EXIF orientation 6) decodes at 1/8 for the 64x64 model; the mask
    is restored to the photo as shown, and agrees with one from the full-size pixels."""
    from service.imaging import decode_image
    from testbed.images import make_images

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.open(io.BytesIO(make_images(1, (1200, 1600), "JPEG")[0])).save(buf, "JPEG", quality=90, exif=exif)
    async with serve(make_settings(tiny_artifact)) as client:
        r = await client.post("/predict", files=[("file", ("photo.jpg", buf.getvalue(), "image/jpeg"))])
    assert r.status_code == 200, r.text
    prediction = r.json()["predictions"][0]
    assert (prediction["width"], prediction["height"]) == (1200, 1600)
    mask = decode_mask(base64.b64decode(prediction["mask_png"]))
    full = tiny_segmenter.predict(decode_image(buf.getvalue(), 10**9))  # decoded at full size
    assert mask.shape == full.shape == (1600, 1200)
    assert (mask == full).mean() > 0.99, (mask == full).mean()


async def test_request_id_echoed_or_made(tiny_artifact):
    async with serve(make_settings(tiny_artifact)) as client:
        echoed = await client.get("/healthz", headers={"x-request-id": "abc-123"})
        made = await client.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    assert echoed.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32


async def test_health_model_and_metrics(tiny_artifact):
    async with serve(make_settings(tiny_artifact, max_batch_size="auto", auto_batch_limit=4)) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        meta = (await client.get("/v1/model")).json()
        before = metric_samples((await client.get("/metrics")).text)
        await client.post("/predict", files=files(random_image(4), random_image(5)))
        await client.post("/predict", content=b"junk", headers={"content-type": "image/png"})
        r = await client.get("/metrics")
    assert meta["name"] == "tiny" and meta["device"] == "cpu" and meta["precision"] == "fp32"
    assert meta["classes"] == ["background", "circle", "rectangle", "triangle"] and meta["input_size"] == [
        64,
        64,
    ]
    assert meta["batching"]["max_batch_size_setting"] == "auto"
    assert 1 <= meta["batching"]["max_batch_size"] <= 4 and meta["batching"]["measured_images_per_s"]
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    for name, kind in DESIGN_METRICS.items():
        assert families.get(name) == kind, name
    assert "process_resident_memory_bytes" in families
    after = metric_samples(r.text)
    assert after[("chanseg_images_total", ())] - before.get(("chanseg_images_total", ()), 0) == 2
    assert after[("chanseg_requests_total", (("endpoint", "predict"), ("status", "200")))] == 1
    assert after[("chanseg_requests_total", (("endpoint", "predict"), ("status", "400")))] == 1
    for hist in ("preprocess_duration", "postprocess_duration", "queue_wait", "inference_duration"):
        assert after[(f"chanseg_{hist}_seconds_count", ())] >= 1, hist
    assert after[("chanseg_request_duration_seconds_count", (("endpoint", "predict"),))] == 2
    info = [k for k in after if k[0] == "chanseg_model_info"]
    assert dict(info[0][1]) == {"name": "tiny", "version": "7", "device": "cpu", "precision": "fp32"}
    labels = {v for k in after for n, v in k[1] if k[0].startswith("chanseg_request") and n != "le"}
    assert labels <= {"predict", "model", "metrics", "healthz", "readyz", "200", "400"}


async def test_start_up_heap_is_frozen_while_serving_and_thawed_after(tiny_artifact):
    """A full collection walks every object it tracks, holding the GIL (~100 ms for a
    ready server's heap here): what start-up built is frozen out of it, and an app
    that stops leaves nothing frozen in a process that goes on."""
    gc.unfreeze()
    async with serve(make_settings(tiny_artifact)) as client:
        state = client.app.state.chanseg
        assert gc.get_freeze_count() > 0
        for built in (client.app, state, state.settings, state.segmenter, state.batcher, state.metrics):
            assert not tracked_by_gc(built), type(built).__name__
        assert (await client.post("/predict", files=files(random_image(1)))).status_code == 200
    assert gc.get_freeze_count() == 0


async def test_concurrent_requests_get_their_own_masks_in_shared_batches(tiny_artifact, tiny_segmenter):
    images = [random_image(100 + i, 40 + i, 60 - i) for i in range(32)]
    async with serve(make_settings(tiny_artifact, max_batch_size=8, max_batch_delay_ms=50)) as client:
        responses = await asyncio.gather(
            *(client.post("/predict", files=files(im), headers={"accept": "image/png"}) for im in images)
        )
        samples = metric_samples((await client.get("/metrics")).text)
    for image, r in zip(images, responses):
        assert r.status_code == 200
        np.testing.assert_array_equal(decode_mask(r.content), tiny_segmenter.predict(image))
    assert samples[("chanseg_batch_size_count", ())] < 32  # batches held more than one image
    assert samples[("chanseg_batch_size_sum", ())] == 32


BAD_REQUESTS = {
    "empty raw body": (dict(content=b"", headers={"content-type": "image/png"}), 422),
    "truncated png": (
        dict(content=png_bytes(random_image(6))[:70], headers={"content-type": "image/png"}),
        400,
    ),
    "text as image/png": (dict(content=b"just some text", headers={"content-type": "image/png"}), 400),
    "wrong content type": (dict(content=b"{}", headers={"content-type": "application/json"}), 415),
    "no content type": (dict(content=b"abc"), 415),
    "zero-byte file part": (dict(files=[("file", ("x.png", b"", "image/png"))]), 400),
    "no file part": (dict(files=[("other", ("x.png", png_bytes(random_image(7)), "image/png"))]), 422),
    "text field named file": (dict(data={"file": "hello"}, files=[("x", ("x", b"1", "text/plain"))]), 422),
    "1x1 image": (dict(content=png_bytes(random_image(8, 1, 1)), headers={"content-type": "image/png"}), 400),
    "too many files": (dict(files=files(*[random_image(9, 8, 8)] * 5)), 413),
    "unknown format value": (
        dict(params={"format": "gif"}, content=b"x", headers={"content-type": "image/png"}),
        422,
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_input_is_a_clear_4xx_and_the_next_request_works(tiny_artifact, case):
    kwargs, status = BAD_REQUESTS[case]
    async with serve(make_settings(tiny_artifact, max_images_per_request=4)) as client:
        r = await client.post("/predict", **kwargs)
        good = await client.post("/predict", files=files(random_image(10)))
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    assert good.status_code == 200


async def test_decompression_bomb_and_body_limits(tiny_artifact):
    from tests.service.test_imaging import _png_claiming

    async with serve(make_settings(tiny_artifact, max_upload_bytes=50_000)) as client:
        bomb = await client.post(
            "/predict", content=_png_claiming(50000, 50000), headers={"content-type": "image/png"}
        )
        declared = await client.post(
            "/predict", content=b"\0" * 60_000, headers={"content-type": "image/png"}
        )

        async def chunks():  # no Content-Length: the limit applies while reading
            for _ in range(100):
                yield b"\0" * 1000

        streamed = await client.post("/predict", content=chunks(), headers={"content-type": "image/png"})
        good = await client.post("/predict", files=files(random_image(11)))
    assert bomb.status_code == 413 and "50000x50000" in bomb.json()["detail"]
    assert declared.status_code == 413 and streamed.status_code == 413
    assert good.status_code == 200


async def test_api_key(tiny_artifact):
    async with serve(make_settings(tiny_artifact, api_key="k3y")) as client:
        missing = await client.post("/predict", files=files(random_image(12)))
        wrong = await client.post("/predict", files=files(random_image(12)), headers={"x-api-key": "nope"})
        bearer = await client.post(
            "/predict", files=files(random_image(12)), headers={"authorization": "Bearer k3y"}
        )
        header = await client.get("/v1/model", headers={"x-api-key": "k3y"})
        model_without = await client.get("/v1/model")
        open_paths = [await client.get(p) for p in ("/healthz", "/readyz", "/metrics")]
    assert missing.status_code == 401 and wrong.status_code == 401 and model_without.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert bearer.status_code == 200 and header.status_code == 200
    assert all(r.status_code == 200 for r in open_paths)


async def test_unexpected_errors_are_generic_500(tiny_artifact, monkeypatch):
    from service import pipeline

    async def broken(*args, **kwargs):
        raise KeyError("internal detail")

    async with serve(make_settings(tiny_artifact)) as client:
        monkeypatch.setattr("service.routes.predict.encode_masks", broken)
        r = await client.post("/predict", files=files(random_image(13)))
        monkeypatch.setattr("service.routes.predict.encode_masks", pipeline.encode_masks)
        good = await client.post("/predict", files=files(random_image(13)))
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
    assert good.status_code == 200


async def test_api_key_setting_lists_every_endpoint_that_stays_open(tiny_artifact):
    """With API_KEY set, exactly the endpoints its description names answer without it
    (docs/configuration.md's row is generated from that description)."""
    documented = set(re.findall(r"`(/[^`]*)`", Settings.model_fields["api_key"].description))
    async with serve(make_settings(tiny_artifact, api_key="k")) as client:
        schema = (await client.get("/openapi.json")).json()
        endpoints = [(path, method.upper()) for path, ops in schema["paths"].items() for method in ops]
        # FastAPI's own pages and the page at / are not in the schema
        endpoints += [
            (path, "GET") for path in _route_paths(client.app.routes) if path not in schema["paths"]
        ]
        open_paths = set()
        for path, method in endpoints:
            url = path.replace("{name}", "tiny").replace("{version}", "7")
            r = await client.request(method, url)
            if r.status_code != 401:
                open_paths.add(path)
    assert len(endpoints) > 15
    assert open_paths == documented


def _route_paths(routes):
    """Every route's path, through included routers (FastAPI >= 0.165 keeps them as one entry each)."""
    for route in routes:
        if hasattr(route, "original_router"):
            yield from _route_paths(route.original_router.routes)
        elif getattr(route, "path", None):
            yield route.path


async def test_setting_max_queue_alone_starts_and_serves(tiny_artifact):
    """CHANSEG_MAX_QUEUE=8 alone: the images-per-request default follows it (it used
    to stay 16 and stop the server at start-up)."""
    settings = make_settings(tiny_artifact, max_queue=8, max_batch_size=4)
    assert settings.max_images_per_request == 8
    async with serve(settings) as client:
        ok = await client.post("/predict", files=files(*[random_image(i) for i in range(8)]))
        over = await client.post("/predict", files=files(*[random_image(i) for i in range(9)]))
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 8
    assert over.status_code == 413


async def test_a_compiled_package_is_served_like_the_artifact(tiny_package, tiny_artifact):
    """MODEL_PATH may be a compiled package: same contract, same masks (to the last
    pixel here), /v1/model says which format serves."""
    image = random_image(21, 70, 50)
    async with serve(make_settings(tiny_package)) as client:
        meta = (await client.get("/v1/model")).json()
        packaged = await client.post("/predict?format=png", files=files(image))
    async with serve(make_settings(tiny_artifact)) as client:
        scripted = await client.post("/predict?format=png", files=files(image))
    assert meta["format"] == "package" and meta["precision"] == "fp32" and meta["version"] == "7"
    assert packaged.status_code == 200
    agree = (decode_mask(packaged.content) == decode_mask(scripted.content)).mean()
    assert agree > 0.999


async def test_predict_rle_is_what_pycocotools_decodes(tiny_artifact, tiny_segmenter):
    mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools is in the dev extra")
    images = [random_image(5, 48, 40), random_image(6, 100, 70)]
    async with serve(make_settings(tiny_artifact)) as client:
        r = await client.post("/predict?format=rle", files=files(*images, names=["a.png", "b.png"]))
    assert r.status_code == 200, r.text
    classes = list(tiny_segmenter.class_names)
    for prediction, image in zip(r.json()["predictions"], images):
        assert "mask_png" not in prediction
        expected = tiny_segmenter.predict(image)
        rebuilt = np.full(expected.shape, 255, np.uint8)
        for name, rle in prediction["mask_rle"].items():
            assert rle["size"] == list(expected.shape)
            rebuilt[mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)] = (
                classes.index(name)
            )
        np.testing.assert_array_equal(rebuilt, expected)
        fractions = np.bincount(expected.ravel(), minlength=len(classes)) / expected.size
        assert list(prediction["class_fractions"].values()) == pytest.approx(list(fractions))


async def test_predict_counts_pixels_and_boxes_each_region(tiny_artifact, tiny_segmenter):
    from tests.model.test_regions import reference

    images = [random_image(7, 90, 130), random_image(8, 20, 25)]  # larger and smaller than the input size
    async with serve(make_settings(tiny_artifact)) as client:
        r = await client.post("/predict", files=files(*images))
    assert r.status_code == 200, r.text
    classes = list(tiny_segmenter.class_names)
    for prediction, image in zip(r.json()["predictions"], images):
        mask = tiny_segmenter.predict(image)
        assert (
            list(prediction["class_pixels"].values())
            == np.bincount(mask.ravel(), minlength=len(classes)).tolist()
        )
        expected = reference(mask, classes)
        assert prediction["region_count"] == len(expected)
        got = [(g["class"], g["bbox"], g["pixels"]) for g in prediction["regions"]]
        assert sorted(got, key=lambda g: (-g[2], g[0], g[1])) == expected[:100]


async def test_confidence_map_as_png_and_in_json(tiny_artifact, tiny_segmenter):
    image = random_image(9, 60, 45)
    expected = np.rint(tiny_segmenter.predict_proba(image).max(0) * 255)
    async with serve(make_settings(tiny_artifact)) as client:
        alone = await client.post("/predict?format=confidence", files=files(image))
        flagged = await client.post("/predict?confidence=true", files=files(image))
        plain = await client.post("/predict", files=files(image))
        two = await client.post("/predict?format=confidence", files=files(image, image))
    assert alone.status_code == 200 and alone.headers["content-type"] == "image/png"
    grey = Image.open(io.BytesIO(alone.content))
    assert grey.mode == "L" and grey.size == (45, 60)
    np.testing.assert_allclose(np.asarray(grey), expected, atol=1)
    body = flagged.json()["predictions"][0]
    assert base64.b64decode(body["confidence_png"]) == alone.content
    assert "mask_png" in body and "confidence_png" not in plain.json()["predictions"][0]
    assert two.status_code == 400 and "one image" in two.json()["detail"]


async def test_the_api_pages_and_their_assets_are_served_here(tiny_artifact):
    async with serve(make_settings(tiny_artifact, api_key="k")) as client:
        for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
            r = await client.get(page)  # open, like /openapi.json
            assert r.status_code == 200 and f"/docs/assets/{asset}" in r.text and "cdn." not in r.text
            js = await client.get(f"/docs/assets/{asset}")
            assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
            assert len(js.content) > 500_000
        assert (
            (await client.get("/docs/assets/swagger-ui.css")).headers["content-type"].startswith("text/css")
        )
        assert (await client.get("/docs/assets/..%2Fcore.py")).status_code == 404
        assert (await client.get("/docs/oauth2-redirect")).status_code == 200


async def test_the_bundled_model_is_cached_where_the_setting_says(tmp_path, monkeypatch):
    """CACHE_DIR is a setting like any other: the server passes it to the model package."""
    monkeypatch.delenv("CHANSEG_CACHE_DIR", raising=False)
    monkeypatch.setenv(
        "XDG_CACHE_HOME", str(tmp_path / "elsewhere")
    )  # where the model package alone would look
    settings = Settings(device="cpu", max_batch_size=1, log_level="warning", cache_dir=tmp_path / "cache")
    async with serve(settings) as client:
        assert (await client.get("/readyz")).status_code == 200
    assert list((tmp_path / "cache").glob("default-*.pt")) and not (tmp_path / "elsewhere").exists()
