#!/usr/bin/env bash
# Build ember's container image and check it answers /health and a chat completion on loopback.
#
# Docker Hub is out of reach on the build machines, so the base image is made here from Debian packages
# (debootstrap) and passed as BASE; torch's CPU wheel comes from the host's wheel folder ($WHEELS, served on
# loopback for the build) and the rest from the host's pip index. Run as root: it installs docker.io and
# debootstrap when missing and starts dockerd when none is running (and stops the one it started).
# Usage: scripts/container_check.sh        (env: IMAGE, BASE, PORT, WHEELS, KEEP_IMAGE=1)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-ember:check}
BASE=${BASE:-ember-base:bookworm}
PORT=${PORT:-18080}
WHEELS=${WHEELS:-/opt/wheels}
WHEEL_PORT=${WHEEL_PORT:-18765}
NAME=ember-check-$$
started_dockerd=""
wheel_server=""
rootfs=""

log() { printf '[container_check] %s\n' "$*"; }
cleanup() {
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    [ -n "$wheel_server" ] && kill "$wheel_server" 2>/dev/null || true
    [ -n "$rootfs" ] && rm -rf "$rootfs"
    [ -n "$started_dockerd" ] && kill "$started_dockerd" 2>/dev/null || true
}
trap cleanup EXIT

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing docker.io and debootstrap from Debian"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (log: /tmp/ember-dockerd.log)"
    dockerd >/tmp/ember-dockerd.log 2>&1 &
    started_dockerd=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { log "dockerd did not start"; exit 1; }
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d /var/tmp/ember-rootfs.XXXXXX)
    log "debootstrap bookworm from $mirror into $rootfs"
    t0=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm \
        "$rootfs" "$mirror" >/tmp/ember-debootstrap.log 2>&1
    # The host's CA bundle: the registries' TLS may be signed by a CA only the host knows.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$rootfs"; rootfs=""
    log "base image $BASE made in $((SECONDS - t0)) s"
fi

build_args=(--build-arg "BASE=$BASE")
if [ -d "$WHEELS" ]; then
    # torch's CPU wheel from the host, over loopback (the build shares the host's network)
    python3 -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$WHEEL_PORT" >/dev/null 2>&1 &
    wheel_server=$!
    build_args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$WHEEL_PORT/" --build-arg TORCH_INDEX=)
fi
index=$(pip config get global.index-url 2>/dev/null || true)
[ -n "$index" ] && build_args+=(--build-arg "PIP_INDEX_URL=$index")

log "docker build $IMAGE"
t0=$SECONDS
docker build -q --network host "${build_args[@]}" -t "$IMAGE" . >/dev/null
log "image built in $((SECONDS - t0)) s: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
[ -n "$wheel_server" ] && { kill "$wheel_server"; wheel_server=""; }

log "docker run on 127.0.0.1:$PORT"
# Host network, so bind the loopback address: inside its own network namespace the image binds 0.0.0.0.
docker run -d --name "$NAME" --network host -e EMBER_HOST=127.0.0.1 -e EMBER_PORT="$PORT" "$IMAGE" >/dev/null
for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
    sleep 0.5
done
log "GET /health -> $(curl -sS "http://127.0.0.1:$PORT/health")"
reply=$(curl -sS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "temperature": 0}')
log "POST /v1/chat/completions -> $reply"
log "container log:"; docker logs "$NAME" 2>&1 | sed 's/^/    /'
docker run --rm --entrypoint id "$IMAGE" | sed 's/^/[container_check] user: /'
echo "$reply" | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["choices"][0]["message"]["content"]' \
    && log "OK" || { log "FAILED"; exit 1; }
docker rm -f "$NAME" >/dev/null

log "docker run with the image's defaults (0.0.0.0 in its own network namespace, no key), HEALTHCHECK every 2 s"
docker run -d --name "$NAME" --network none --health-interval 2s "$IMAGE" >/dev/null
health=starting
for _ in $(seq 120); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
    [ "$health" = starting ] || break
    sleep 0.5
done
log "HEALTHCHECK status: $health"
docker logs "$NAME" 2>&1 | grep -E '^(warning|ember serving)' | sed 's/^/    /'
docker logs "$NAME" 2>&1 | grep -q '^warning: listening on 0.0.0.0 without an API key' \
    || { log "FAILED: no warning about the open bind"; exit 1; }
[ "$health" = healthy ] || { log "FAILED: not healthy"; exit 1; }
docker rm -f "$NAME" >/dev/null
log "OK"
[ -n "${KEEP_IMAGE:-}" ] || docker rmi "$IMAGE" >/dev/null
