"""The event loop's floor: what one ``POST /predict`` costs a bare ASGI app on the same
uvicorn (uvloop, httptools) against what it costs chanseg, the same bodies from the
same client at the same concurrency, in one run.

``python -m benchmarks.floor --images png256 jpeg1024 --requests 400 --rounds 3 [--model M]``

The bare app reads the request's body, waits, and answers 2 KB (a mask PNG's size):
no multipart parsing, no decoding, no model. It waits as long as chanseg takes per
request at that concurrency (measured first, per image set), so that both serve
about the same requests a second: an event loop woken less often does more per
wake-up and less per request, so a bare app answering at once would look cheaper
than any server that waits for a model. Its main thread's CPU per request is what
HTTP and the ASGI call cost a Python server here; chanseg's event loop (``main``)
over it is chanseg's own work per request on that thread (``docs/performance.md``,
"Host work per image"). Each round sends ``--requests`` images to one server, then
to the other (``benchmarks.ab``'s rounds); medians of the rounds, ms of CPU per
request by thread role (``benchmarks.cpu``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import List

import httpx

from benchmarks.ab import host_rounds
from model.visualize import PNG_SIGNATURE
from testbed.images import IMAGE_SETS
from testbed.processes import ROOT, ServiceProcess, child_env, free_port, stop_group

_ANSWER = PNG_SIGNATURE + bytes(2040)
_HOLD_S = float(os.environ.get("FLOOR_HOLD_S", "0"))


async def app(scope, receive, send) -> None:
    """Read the body, wait ``FLOOR_HOLD_S``, answer the same 2 KB."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await asyncio.sleep(_HOLD_S)
    headers = [(b"content-type", b"image/png"), (b"content-length", str(len(_ANSWER)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": _ANSWER})


def _bare_server(port: int, hold_s: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.floor", "--serve", str(port)],
        cwd=ROOT,
        env=child_env(None, {"FLOOR_HOLD_S": str(hold_s)}),  # as chanseg's: no LD_PRELOAD
        start_new_session=True,  # its process group is its own: benchmarks.cpu reads it
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.post(f"http://127.0.0.1:{port}/predict", content=b"x").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_group(proc, 10)
    raise RuntimeError(f"the bare server did not start (exit code {proc.returncode})")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", nargs="+", choices=list(IMAGE_SETS), default=["png256"])
    parser.add_argument("--requests", type=int, default=400, help="per server, image set and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--model", help="chanseg's CHANSEG_MODEL_PATH (default: the bundled model)")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the bare server itself
    args = parser.parse_args(argv)
    if args.serve:
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=args.serve, log_level="warning", access_log=False)
        return 0
    env = {"CHANSEG_DEVICE": "cpu", "CHANSEG_MAX_BATCH_SIZE": "4", "CHANSEG_LOG_LEVEL": "warning"}
    if args.model:
        env["CHANSEG_MODEL_PATH"] = args.model
    chanseg = ServiceProcess(env)
    try:
        chanseg.wait_ready(600)
        for name in args.images:
            images, c = IMAGE_SETS[name](), args.concurrency
            pace = host_rounds(
                {"chanseg": chanseg.url}, {"chanseg": chanseg.proc.pid}, images, args.requests, 1, c, ""
            )
            hold_s = c / pace["chanseg"]["img/s"]  # each request as long as chanseg's take
            port = free_port()
            bare = _bare_server(port, hold_s)
            try:
                urls = {"bare ASGI app": f"http://127.0.0.1:{port}", "chanseg": chanseg.url}
                pgids = {"bare ASGI app": bare.pid, "chanseg": chanseg.proc.pid}
                found = host_rounds(urls, pgids, images, args.requests, args.rounds, c, "")
            finally:
                stop_group(bare, 10)
            for server, v in found.items():
                cells = ", ".join(f"{role} {v[role]:.3f}" for role in ("main", "io", "total"))
                print(f"{name:10} c{c} {server:14} ms/request: {cells}; {v['img/s']:.1f} req/s")
            floor, ours = found["bare ASGI app"]["main"], found["chanseg"]["main"]
            print(
                f"{name:10} event loop: chanseg {ours:.3f} ms, the floor {floor:.3f} ms, chanseg's own {ours - floor:.3f} ms"
            )
    finally:
        chanseg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
