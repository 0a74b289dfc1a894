"""How a v2 JSON tensor is read: time per value, and the longest the reading held Python's
interpreter lock (what the event loop, and so ``/healthz``, waits for), for an RGB image
as a flat and as a nested list, read three ways in one run:

- ``json``: ``json.loads`` and ``np.asarray`` (chanseg before issue 34);
- ``orjson``: ``orjson.loads`` and ``np.asarray``;
- ``chanseg``: ``service.v2_codec.decode_request`` and the input's array (service.v2_json).

``python -m benchmarks.json_parse --sides 256 1024``
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import orjson

from service.v2_codec import decode_request


class LockWatch:
    """A thread that sleeps 1 ms at a time: the longest gap between its wake-ups is the
    longest anything else held the interpreter lock (plus the 1 ms)."""

    def __enter__(self):
        self.gaps, self._stop = [0.0], False
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        time.sleep(0.02)
        return self

    def _tick(self) -> None:
        last = time.perf_counter()
        while not self._stop:
            time.sleep(0.001)
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()

    @property
    def longest_ms(self) -> float:
        return max(self.gaps) * 1000


def _body(image: np.ndarray, nested: bool) -> bytes:
    data = image.tolist() if nested else image.ravel().tolist()
    doc = {"inputs": [{"name": "IMAGE", "shape": list(image.shape), "datatype": "UINT8", "data": data}]}
    return json.dumps(doc, separators=(",", ":")).encode()


def _read(how: str, body: bytes) -> np.ndarray:
    if how == "chanseg":
        return decode_request(body, None).inputs[0].array()
    doc = (json.loads if how == "json" else orjson.loads)(body)
    return np.asarray(doc["inputs"][0]["data"], dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'image':>14} {'layout':>7} {'MB':>6} {'reader':>8} {'ns/value':>9} {'lock held ms':>13}")
    for side in args.sides:
        image = rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8)
        for nested in (False, True):
            body = _body(image, nested)
            for how in ("json", "orjson", "chanseg"):
                best, held = float("inf"), 0.0
                for _ in range(args.repeat):
                    with LockWatch() as watch:
                        started = time.perf_counter()
                        out = _read(how, body)
                        best = min(best, time.perf_counter() - started)
                    held = max(held, watch.longest_ms)
                    assert np.array_equal(out.reshape(image.shape), image)
                    del out
                print(
                    f"{f'{side}x{side}x3':>14} {'nested' if nested else 'flat':>7} {len(body) / 1e6:6.1f} {how:>8} "
                    f"{best * 1e9 / image.size:9.1f} {held:13.1f}"
                )


if __name__ == "__main__":
    main()
