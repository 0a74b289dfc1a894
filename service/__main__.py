"""``python -m service``: run the server with uvicorn, draining on SIGTERM.

First SIGTERM/SIGINT: ``/readyz`` and new work get 503 while accepted requests
finish (at most ``DRAIN_TIMEOUT_S``), then the server stops and exits 0.
A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import uvicorn

from .app import create_app
from .logs import configure_logging
from .settings import Settings

log = logging.getLogger("chanseg.main")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain phase between the signal and the stop."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state
        self._drain_task = None

    def handle_exit(self, sig, frame) -> None:
        if self._drain_task is not None or not self.state.ready:
            return super().handle_exit(sig, frame)  # second signal, or still starting: stop now
        self.state.start_draining()
        loop = asyncio.get_event_loop()
        self._drain_task = loop.create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.state.settings.drain_timeout_s
        batcher = self.state.batcher
        while time.monotonic() < deadline and batcher is not None and batcher.depth > 0:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let the last responses be written
        self.should_exit = True


def main() -> int:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        lifespan="on",
    )
    server = DrainingServer(config, app.state.chanseg)
    server.run()
    return 0 if server.started or not server.should_exit else 1


if __name__ == "__main__":
    sys.exit(main())
