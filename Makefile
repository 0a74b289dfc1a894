# Set-up and checks. `make test` and `make serve` create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
# Installed before the project so that pip never resolves a (multi-GB) CUDA
# build of torch. Override for a GPU machine, e.g.
#   make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' test
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= serve,grpc,tracing,dev,bench,ray
BIN := $(VENV)/bin

# tcmalloc when installed (apt-get install libtcmalloc-minimal4): see docs/performance.md, "Allocator".
TCMALLOC := $(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4))

.PHONY: install test test-all lint docs docs-pages serve reliability bench-model bench-serve gpu-rehearsal screenshot site-screenshot clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	# Triton's perf_analyzer (the tests' and the harness's second load generator), from PyPI.
	$(BIN)/python -m testbed.perf_analyzer install >/dev/null
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check .

# The tiers: `make test` is the unit and in-process tests and one real-process smoke test
# (a few minutes); `make test-all` is everything, the real servers and real parts too
# (what .ci/run runs). A test that starts a server, a real part or a compile is marked slow.
test: install lint
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-all: install lint
	$(BIN)/pytest $(PYTEST_ARGS)

# The reliability suite's long forms (60 s held load, 20 s overload, 5 min soak, a rolling update of all
# three replicas behind HAProxy, Ray Serve scaling out and redeployed under load); `make test` runs the
# short ones.
reliability: install
	CHANSEG_RELIABILITY=long $(BIN)/pytest -s -m reliability tests/reliability tests/deploy/test_rolling_update.py
	CHANSEG_RELIABILITY=long $(BIN)/pytest -s tests/deploy/test_ray.py

# The documentation site (mkdocs.yml, docs/) into site/, offline and strict: a broken link or
# anchor fails. `make test-all` builds it too (tests/test_docs.py), and runs its examples.
docs: install
	$(BIN)/mkdocs build --strict

# docs/configuration.md and docs/metrics.md, written from Settings and the metric definitions
# (tests/test_docs.py fails when they are stale).
docs-pages: install
	$(BIN)/python -m service.docs_pages

# docs/site.png, the site's landing page: the site's browser test, keeping its screenshot.
site-screenshot: install
	CHANSEG_SITE_SCREENSHOT=docs/site.png $(BIN)/pytest -q tests/test_docs.py -k browser

# docs/page.png, the README's picture of the page at /: the browser test, keeping its screenshot.
screenshot: install
	CHANSEG_SCREENSHOT=docs/page.png $(BIN)/pytest -q tests/service/test_page.py

# The first time on a machine: the bundled model compiled for it (torch.export +
# AOTInductor, each precision the CPU has, the fastest within 0.005 mIoU of fp32; a
# few minutes on 2 cores, once). The server then loads that package.
serve: install
	LD_PRELOAD=$(TCMALLOC) $(BIN)/python -m model compile --if-missing
	LD_PRELOAD=$(TCMALLOC) $(BIN)/python -m service

bench-serve: install
	$(BIN)/python -m benchmarks run

bench-model: install
	$(BIN)/pip install --quiet -e '.[peers]'
	$(BIN)/python benchmarks/model_speed.py
	$(BIN)/python -m model compile --if-missing
	$(BIN)/python benchmarks/model_speed.py --compare --batches 1 4 8

# The GPU machine's one command (docs/performance.md, "On a GPU"), rehearsed on this CPU: an environment
# like that machine's image (Python 3.12, torch 2.11, its packages only: 2.6 GB, kept in
# ~/.cache/chanseg-gpu-rehearsal), the carried wheels, benchmarks/gpu_device_run.sh on a copy
# of the tree with the CUDA steps on cpu, and checks of what would come back. Needs no .venv.
gpu-rehearsal:
	bash benchmarks/gpu_rehearsal.sh

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache
