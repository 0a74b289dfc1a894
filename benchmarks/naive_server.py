"""The server most people write first: the model runs inside the request handler.

The same TorchScript file opened the usual way (``torch.jit.load``, ``eval``,
``no_grad``) or, given a compiled package, that package as its documentation
loads it (``torch._inductor.aoti_load_package``), the same preprocessing (PIL bilinear resize to the input size,
the artifact's mean/std) and the same mask PNG as chanseg; no batching, no
queue, no limits, no metrics, and decoding and inference on the event loop
(an ``async def`` handler that blocks it). Against chanseg it also lacks what
``model.load`` adds (freezing, channels-last: 1.2-1.5x on this CPU, see
``benchmarks/model_speed.py``); LitServe in the harness gets ``model.load``,
so that comparison is about serving alone.

    python -m benchmarks.naive_server --port 8001 [--model PATH]
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Response, UploadFile
from PIL import Image

from model.precision import PRECISIONS
from model.pretrained import default_artifact_path
from model.visualize import mask_png_bytes


def _open(model_path: str | None):
    """(callable network, config dict, input dtype, channels-last?)"""
    from model.compiled import is_package, read_meta

    if model_path and is_package(model_path):
        config, meta = read_meta(model_path)
        net = torch._inductor.aoti_load_package(model_path)
        return net, config.to_dict(), PRECISIONS[meta["precision"]], bool(meta["channels_last"])
    files = {"config.json": ""}
    net = torch.jit.load(model_path or str(default_artifact_path()), map_location="cpu", _extra_files=files)
    return net.eval(), json.loads(files["config.json"]), torch.float32, False


def create_app(model_path: str | None = None) -> FastAPI:
    net, config, dtype, channels_last = _open(model_path)
    height, width = config["input_size"]
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    app = FastAPI(title="naive segmentation server")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: UploadFile) -> Response:
        image = Image.open(io.BytesIO(await file.read())).convert("RGB")
        size = image.size
        pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
        x = ((torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255 - mean) / std).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            labels = net(x).argmax(1)[0].to(torch.uint8).numpy()
        mask = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
        return Response(mask_png_bytes(mask, len(config["class_names"])), media_type="image/png")

    return app


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", help="artifact (default: the bundled model)")
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
