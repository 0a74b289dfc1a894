# chanseg: the model server on the bundled default model.
#
#   CPU (default):  docker build -t chanseg .
#   CUDA:           docker build -t chanseg:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg COMPILE=none .
#                   docker run --gpus all -e CHANSEG_PRECISION=fp16 -p 8000:8000 chanseg:cuda
#
# Build arguments: TORCH_SPEC (the torch requirement), TORCH_INDEX_URL (where
# pip looks for it: the CPU or a CUDA wheel index), TORCH_FIND_LINKS (a page
# or folder of wheels searched for torch first, e.g. a local mirror).

ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- build stage
FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH

# COMPILE: the precision(s) of the compiled packages made below, or none.
ARG COMPILE=auto

# DL3008 (pin apt versions): the base image's release pins them; exact Debian
# versions disappear from the mirrors with every point release and break builds.
# g++ compiles the packages (AOTInductor), so COMPILE=none needs none. SC2086: $compiler may be empty.
# hadolint ignore=DL3008,SC2086
RUN compiler=g++; if [ "$COMPILE" = none ]; then compiler=; fi; \
    apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv $compiler \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch alone first: the biggest layer, changed only by its build arguments.
# DL3013 (pin pip versions): TORCH_SPEC pins torch. SC2086: $src is two words on purpose.
# hadolint ignore=DL3013,SC2086
RUN if [ -n "$TORCH_FIND_LINKS" ]; then src="--find-links $TORCH_FIND_LINKS"; \
    else src="--index-url $TORCH_INDEX_URL"; fi; \
    pip install $src "$TORCH_SPEC"

# Then the dependencies, from pyproject.toml alone (empty packages stand in for the code).
WORKDIR /src
COPY pyproject.toml README.md ./
# DL3013 (pin pip versions): versions come from pyproject.toml's ranges (and the torch pinned above).
# hadolint ignore=DL3013
RUN mkdir model service && touch model/__init__.py service/__init__.py \
    && pip install ".[serve,grpc,tracing]" && pip uninstall -y chanseg && rm -rf model service build ./*.egg-info

# Then the code, and the default model compiled at build time: to TorchScript, and
# (COMPILE=auto) to packages for the build machine's CPU (g++ above is for
# AOTInductor; the final stage needs none). Where the serving CPU lacks an
# instruction set the package was compiled for, the server says so and serves
# TorchScript; `docker run ... python -m model compile` in a volume compiles for it.
COPY model ./model
COPY service ./service
# DL3013 (pin pip versions): this installs the project itself, from the copied source.
# hadolint ignore=DL3013
RUN pip install --no-deps . \
    && mkdir -p /opt/chanseg \
    && CHANSEG_CACHE_DIR=/opt/chanseg/cache python -m model info > /opt/chanseg/model-info.json \
    && if [ "$COMPILE" != none ]; then CHANSEG_CACHE_DIR=/opt/chanseg/cache python -m model compile --precision "$COMPILE" --device cpu; fi

# ---------------------------------------------------------------- final stage
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3008 (pin apt versions): as in the build stage, the base image's release pins them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(find /usr/lib -name libtcmalloc_minimal.so.4 | head -n 1)" /usr/local/lib/libtcmalloc_minimal.so.4 \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin chanseg

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/chanseg /opt/chanseg

# Settings: every CHANSEG_* with a fixed default, as the server would take it
# (docs/configuration.md), but HOST (all interfaces), DRAIN_TIMEOUT_S (inside
# Docker's 10 s), LOG_FORMAT (json) and GRPC_PORT (8001, as Triton's: gRPC on). Left unset on purpose: MODEL_PATH, NUM_THREADS
# and API_KEY (unset is their default), and the settings whose defaults follow
# others (MAX_QUEUE, MEMORY_BUDGET_MB, MAX_REQUEST_PIXELS, MAX_UPLOAD_BYTES,
# MAX_JSON_BYTES, MAX_IMAGES_PER_REQUEST): set here, they would stop a container
# started with, say, a larger MAX_BATCH_SIZE or a smaller budget.
# tcmalloc: measured fastest for this model on CPU, glibc malloc and jemalloc
# slower at batch > 1 (docs/performance.md, "Allocator").
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4 \
    CHANSEG_CACHE_DIR=/opt/chanseg/cache \
    CHANSEG_HOST=0.0.0.0 \
    CHANSEG_PORT=8000 \
    CHANSEG_GRPC_PORT=8001 \
    CHANSEG_DEVICE=auto \
    CHANSEG_PRECISION=auto \
    CHANSEG_MODEL_FORMAT=auto \
    CHANSEG_MAX_BATCH_SIZE=auto \
    CHANSEG_MAX_BATCH_DELAY_MS=5 \
    CHANSEG_AUTO_BATCH_LIMIT=32 \
    CHANSEG_AUTO_BATCH_BUDGET_S=10 \
    CHANSEG_REMEASURE_BATCH_SIZE=false \
    CHANSEG_REQUEST_TIMEOUT_S=30 \
    CHANSEG_MAX_IMAGE_PIXELS=64000000 \
    CHANSEG_MIN_IMAGE_SIDE=8 \
    CHANSEG_READ_TIMEOUT_S=60 \
    CHANSEG_MAX_CONNECTIONS=256 \
    CHANSEG_WATCHDOG_S=auto \
    CHANSEG_LOAD_TIMEOUT_S=300 \
    CHANSEG_IO_THREADS=auto \
    CHANSEG_INFERENCE_STREAMS=auto \
    CHANSEG_DRAIN_TIMEOUT_S=8 \
    CHANSEG_LOG_FORMAT=json \
    CHANSEG_TRACING=false \
    CHANSEG_LOG_LEVEL=info

USER 10001
WORKDIR /tmp
EXPOSE 8000 8001
# Docker's default stop timeout is 10 s: the shutdown budget (DRAIN_TIMEOUT_S=8,
# + ~1.5 s to exit) ends first (tests/deploy/test_manifests.py checks it).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["python3", "-m", "service"]
