"""LitServe (the nearest peer) serving the same artifact with its own batching.

Same ``model.load`` (frozen, channels-last), the same three stages as chanseg
(``prepare``, one batched ``infer``, ``restore`` + mask PNG) and the same
answer (the mask PNG). The request is LitServe's documented way of sending an
image, JSON ``{"image": base64}``: its multipart path fails here (LitServe
0.2.19 with starlette 1.x cannot pickle the parsed form onto its worker
queue, a 500 for every request). LitServe runs decode, batch, predict and
encode in its inference worker process, behind its own API server process.
Needs the ``bench`` extra (``pip install -e '.[bench]'``).

    python -m benchmarks.litserve_server --port 8002 --max-batch-size 4 [--model PATH]
"""

from __future__ import annotations

import argparse
import base64
import io

import litserve as ls
from fastapi import Response
from PIL import Image

import model
from model.visualize import mask_png_bytes


class SegmentationAPI(ls.LitAPI):
    def __init__(self, model_path: str | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_path = model_path

    def setup(self, device) -> None:
        self.segmenter = model.load(
            self.model_path, device="cpu" if device == "cpu" else device, precision="auto"
        )  # as chanseg serves it

    def decode_request(self, request: dict):
        image = Image.open(io.BytesIO(base64.b64decode(request["image"])))
        return self.segmenter.prepare(image), (image.height, image.width)

    def batch(self, inputs):
        return inputs

    def predict(self, x):
        items = x if isinstance(x, list) else [x]
        labels = self.segmenter.infer([tensor for tensor, _ in items])
        out = [(lab, size) for lab, (_, size) in zip(labels, items)]
        return out if isinstance(x, list) else out[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output) -> Response:
        labels, size = output
        mask = self.segmenter.restore(labels, size)
        return Response(mask_png_bytes(mask, self.segmenter.config.num_classes), media_type="image/png")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--model", help="artifact (default: the bundled model)")
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()
    api = SegmentationAPI(
        args.model, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000
    )
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=1, timeout=60)
    server.run(
        host=args.host, port=args.port, log_level="warning", generate_client_file=False, num_api_servers=1
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
