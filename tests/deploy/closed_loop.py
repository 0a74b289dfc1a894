"""A closed loop of clients posting images, for the scale-out tests (HAProxy, Ray Serve)."""

from __future__ import annotations

import threading
import time
from typing import Sequence

import httpx


class ClosedLoop:
    """``clients`` threads, each posting ``/predict?format=png`` to ``url`` as soon as its
    last answer came (client ``i`` sends ``bodies[i % len(bodies)]``). Each answer is kept
    as ``(sent, answered, status, *headers)``: the monotonic times, the status (the
    transport error's name when there was no answer) and the values of ``headers``.
    Starts at once; ``finish()`` (or leaving a ``with`` block) stops it."""

    def __init__(self, url: str, bodies: Sequence[bytes], headers: Sequence[str], clients: int = 3) -> None:
        self.answers: list = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(url, bodies[i % len(bodies)], headers))
            for i in range(clients)
        ]
        for t in self.threads:
            t.start()

    def _loop(self, url: str, body: bytes, headers: Sequence[str]) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post("/predict?format=png", files={"file": ("x.png", body, "image/png")})
                    answer = (r.status_code, *(r.headers.get(h) for h in headers))
                except httpx.TransportError as exc:
                    answer = (type(exc).__name__, *(None for _ in headers))
                self.answers.append((sent, time.monotonic(), *answer))

    def count(self) -> int:
        return len(self.answers)

    def finish(self) -> list:
        self.stop.set()
        for t in self.threads:
            t.join(90)
        return self.answers

    def __enter__(self) -> "ClosedLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()
