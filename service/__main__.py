"""``python -m service``: run the server with uvicorn, draining on SIGTERM.

First SIGTERM/SIGINT: ``/readyz`` and new work get 503 while accepted requests
finish; the process is gone within ``DRAIN_TIMEOUT_S`` of the signal (plus the
interpreter's exit), whatever is still running. Exit status 0 when everything
accepted was finished, 1 when the budget ran out first. A second signal stops
at once.
"""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from .app import create_app
from .logs import configure_logging
from .server import DrainingServer, protocol_class
from .settings import Settings

log = logging.getLogger("chanseg.main")


def main() -> int:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    state = app.state.chanseg
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_class(settings.read_timeout_s, settings.max_connections, state.metrics),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        lifespan="on",
    )
    server = DrainingServer(config, state)
    server.run()
    if not server.started and server.should_exit:
        return 1
    code = 0 if state.drained and state.device_error is None else 1
    if state.batcher is not None and state.batcher.busy_for > 0:
        # A batch still runs (a stuck device or kernel): Python would wait for its
        # thread at exit, past every grace period. Go now; the logs are flushed.
        log.error("exiting with a batch still running for %.0f s", state.batcher.busy_for)
        logging.shutdown()
        os._exit(code or 1)
    return code


if __name__ == "__main__":
    sys.exit(main())
