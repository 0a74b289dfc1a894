"""``python -m service``: run the server with uvicorn, draining on SIGTERM.

First SIGTERM/SIGINT: ``/readyz`` and new work get 503 while accepted requests
finish; the process is gone within ``DRAIN_TIMEOUT_S`` of the signal (plus the
interpreter's exit), whatever is still running, a stuck batch or model load included. Exit status 0 when everything
accepted was finished, 1 when the budget ran out first. A second signal stops
at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

import uvicorn

from .app import create_app
from .logs import configure_logging
from .server import DrainingServer, protocol_class
from .settings import Settings

log = logging.getLogger("chanseg.main")


def main(argv: Optional[List[str]] = None, settings: Optional[Settings] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Run the chanseg server. It takes no options: every setting is an environment variable "
        "(CHANSEG_PORT, CHANSEG_MODEL_PATH, CHANSEG_API_KEY, ...; docs/configuration.md lists them), "
        "or use `chanseg serve --help` for the common ones as options.",
    )
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    settings = settings or Settings()
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
    try:
        server.run()
    except SystemExit as exc:  # uvicorn's start-up failure: the lifespan raised
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        stopped_starting = not server.started and server.should_exit
        code = 0 if state.drained and state.device_error is None and not stopped_starting else 1
    if state.inference_busy:
        # A batch, load or warm-up still runs (a stuck device, kernel or model): Python would
        # wait for its thread at exit, past every grace period. Go now; the logs are flushed.
        log.error("exiting with the inference thread still busy (batch %.0f s, load %.0f s)",
                  state.batcher.busy_for if state.batcher else 0.0, state.load_running_for)  # fmt: skip
        logging.shutdown()
        os._exit(code or 1)
    return code


if __name__ == "__main__":
    sys.exit(main())
