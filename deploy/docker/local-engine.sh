#!/usr/bin/env bash
# A real Docker engine on a machine without one running, for the image test
# (tests/deploy/test_docker.py) and for trying the image by hand. Debian only.
#
#   deploy/docker/local-engine.sh start    # install docker.io + debootstrap if missing, start dockerd,
#                                          # make a local debian:bookworm-slim base image (no registry pulls)
#   deploy/docker/local-engine.sh build T [ARGS]  # docker build -t T [ARGS] . (torch from the local wheel folder if any)
#   deploy/docker/local-engine.sh stop
#   eval "$(deploy/docker/local-engine.sh env)"   # DOCKER_HOST for your shell
#
# The base image carries this machine's extra CA certificates (an intercepting
# proxy) and PIP_CERT: that is scaffolding of this test machine, never part of
# the project's Dockerfile. State lives in $CHANSEG_DOCKER_DIR (/tmp/chanseg-docker).
set -euo pipefail
W=${CHANSEG_DOCKER_DIR:-/tmp/chanseg-docker}
SOCK=$W/docker.sock
export DOCKER_HOST=unix://$SOCK
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

log() { echo "[local-engine] $*" >&2; }

install_tools() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

start_engine() {
  mkdir -p "$W"
  if docker version >/dev/null 2>&1; then return; fi
  if [ -f "$W/dockerd.pid" ] && ! kill -0 "$(cat "$W/dockerd.pid")" 2>/dev/null; then
    rm -f "$W/dockerd.pid" "$SOCK"  # left by an engine that was killed
  fi
  log "starting dockerd"
  nohup dockerd --host "$DOCKER_HOST" --data-root "$W/data" --exec-root "$W/exec" \
    --pidfile "$W/dockerd.pid" >"$W/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && return
    sleep 1
  done
  log "dockerd did not start:"; tail -n 20 "$W/dockerd.log" >&2; exit 1
}

make_base() {
  if docker image inspect debian:bookworm-slim >/dev/null 2>&1; then return; fi
  local mirror rootfs=$W/rootfs
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  log "debootstrap bookworm from $mirror"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" >"$W/debootstrap.log" 2>&1
  if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/" 2>/dev/null || true
  rm -rf "$rootfs/var/cache/apt/archives"/*.deb
  tar --numeric-owner -C "$rootfs" -cf "$W/rootfs.tar" .
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' "$W/rootfs.tar" debian:bookworm-slim >/dev/null
  rm -rf "$rootfs" "$W/rootfs.tar"
}

build() {
  local tag=$1 args=()
  shift
  args+=("$@")
  local wheels
  wheels=$(pip config get global.find-links 2>/dev/null || true)
  if [ -n "$wheels" ] && ls "$wheels"/torch-*.whl >/dev/null 2>&1; then
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$wheels" >/dev/null 2>&1 &
    local server=$!
    trap 'kill $server 2>/dev/null || true' RETURN
    sleep 0.5
    args+=(--build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$port/")
  fi
  DOCKER_BUILDKIT=0 docker build --network host "${args[@]}" -t "$tag" "$ROOT"
}

case "${1:-}" in
  start) install_tools; start_engine; make_base ;;
  build) shift; build "${1:-chanseg:test}" "${@:2}" ;;
  env) echo "export DOCKER_HOST=$DOCKER_HOST" ;;
  stop)
    if [ -f "$W/dockerd.pid" ]; then kill "$(cat "$W/dockerd.pid")" 2>/dev/null || true; fi ;;
  *) echo "usage: $0 start|build TAG|env|stop" >&2; exit 2 ;;
esac
