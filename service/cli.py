"""``chanseg``: one command for the server and the model package.

    chanseg serve [--model PATH] [--host H] [--port P] [--device D] [--precision P]
    chanseg predict photo.jpg photos/ --out masks/
    chanseg {compile,export,import,info,train,eval,sheet} ...   (python -m model's commands)
    chanseg bench ...                                           (python -m benchmarks run, from a checkout)

``python -m service`` and ``python -m model`` keep working; this only dispatches.
``serve``'s options are the settings of the same name (``CHANSEG_*``; docs/configuration.md
has all of them, and any can be set in the environment as well); they are passed
to the server as settings, not through the environment.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

MODEL_COMMANDS = ("predict", "compile", "export", "import", "info", "train", "eval", "sheet")
USAGE = """usage: chanseg COMMAND [--help]

commands:
  serve     run the HTTP server (python -m service)
  predict   masks and overlays for image files or folders
  compile   torch.export + AOTInductor package for this machine
  export    safetensors weights + config -> TorchScript artifact
  import    your own TorchScript or Keras segmentation model -> chanseg artifact
  info      an artifact's metadata
  train     train the network (synthetic shapes or a folder)
  eval      per-class IoU, mIoU and pixel accuracy
  sheet     a PNG of images beside predicted and true masks
  bench     the serving benchmark (python -m benchmarks run; needs a source checkout)
"""


SERVE_OPTIONS = (  # (option, setting, help): each sets the setting of that name (None: its description)
    ("model", "model_path", "TorchScript artifact or compiled package (default: the bundled model)"),
    ("host", "host", "listen address (default 127.0.0.1)"),
    ("port", "port", "listen port (default 8000)"),
    ("device", "device", None),
    ("precision", "precision", "auto, fp32, fp16 or bf16"),
    ("max-batch-size", "max_batch_size", "auto or a number"),
)


def serve(argv: List[str]) -> int:
    from pydantic import ValidationError

    from .__main__ import main as serve_main
    from .settings import Settings

    parser = argparse.ArgumentParser(
        prog="chanseg serve",
        description="Run the server. Each option sets the setting of the same name; every other setting is "
        "read from the environment (CHANSEG_*: docs/configuration.md). The API key is read from a file or from "
        "CHANSEG_API_KEY, never from the command line (the process list shows it to every user).",
    )
    for option, setting, help_ in SERVE_OPTIONS:
        parser.add_argument(f"--{option}", help=help_ or Settings.model_fields[setting].description)
    parser.add_argument(
        "--api-key-file", metavar="FILE", help="require the key in FILE (its first non-empty line)"
    )
    parser.add_argument("--api-key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.api_key is not None:
        parser.error(
            "--api-key would show the key in the process list: use --api-key-file FILE or CHANSEG_API_KEY"
        )
    overrides = {setting: getattr(args, option.replace("-", "_")) for option, setting, _ in SERVE_OPTIONS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"--api-key-file {args.api_key_file}: {exc}")
        key = next((line.strip() for line in lines if line.strip()), None)
        if key is None:  # an empty key would mean no key at all
            parser.error(f"--api-key-file {args.api_key_file}: the file holds no key")
        overrides["api_key"] = key
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        parser.error(str(exc))
    return serve_main([], settings)


def bench(argv: List[str]) -> int:
    """``python -m benchmarks`` of the checkout this runs in, as a child process: the
    benchmarks are not part of the installed package, and ``service`` never imports them."""
    if not os.path.isfile(os.path.join("benchmarks", "harness.py")):
        print(
            "error: chanseg bench runs the benchmarks of a chanseg source checkout "
            "(benchmarks/ is not installed with the package): run it from the checkout's root",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks", "run", *argv])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "bench":
        return bench(rest)
    if command in MODEL_COMMANDS:
        from model.__main__ import main as model_main

        return model_main([command, *rest], prog="chanseg")
    print(f"chanseg: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
