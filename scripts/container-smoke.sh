#!/usr/bin/env bash
# Builds a CPU image of the Dockerfile with podman, runs it, and checks that it answers /ready,
# serves the playground, and streams token events from /generate; then removes the container.
# For a machine with no Docker engine and no image registry (../shared/CONTAINERS.md): the base
# image is made locally with debootstrap, and torch is the CPU wheel found on local disk.
# Slow (minutes, the first time); not part of CI. Needs root and apt-get for the tools.
#   scripts/container-smoke.sh            # TORCH_WHEEL=path/to/torch-*.whl to choose the wheel
#   TORCH_WHEEL=default scripts/container-smoke.sh   # the default image: the CUDA torch from the index
#                                                    # (GBs to download); CUDA torch runs on a CPU too
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${QUILL_SMOKE_DIR:-/tmp/quill-smoke}  # podman's storage and the debootstrapped base
PORT=${QUILL_SMOKE_PORT:-18123}  # host networking (the sandbox allows no other): a port others leave alone
BASE=localhost/debian:bookworm
IMAGE=localhost/quill:smoke
NAME=quill-smoke
TORCH_WHEEL=${TORCH_WHEEL:-$(find /opt/wheels "${PIP_FIND_LINKS:-/nonexistent}" -maxdepth 1 \
  -name 'torch-*+cpu-*.whl' 2>/dev/null | head -n 1)}
step() { printf '\n== %s\n' "$*"; }

for tool in podman buildah runc debootstrap; do
  command -v "$tool" >/dev/null || { apt-get update -q && apt-get install -y -q podman buildah runc debootstrap; break; }
done
[ "$TORCH_WHEEL" = default ] || [ -f "$TORCH_WHEEL" ] || { echo "no CPU torch wheel found; set TORCH_WHEEL" >&2; exit 1; }

# crun fails in this sandbox (cgroups, rlimits): runc, and limits the sandbox allows.
mkdir -p "$WORK"
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf CONTAINERS_CONF=$WORK/containers.conf
printf '[storage]\ndriver="overlay"\ngraphroot="%s/graph"\nrunroot="%s/run"\n' "$WORK" "$WORK" > "$CONTAINERS_STORAGE_CONF"
printf '[containers]\ndefault_ulimits=["nofile=20000:20000","nproc=32768:32768"]\n[engine]\nruntime="runc"\n' \
  > "$CONTAINERS_CONF"

if ! podman image exists "$BASE"; then
  step "making $BASE with debootstrap (about 2 minutes)"
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" > "$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE"
fi

# The wheel goes into the build context's wheels/ (pip's --find-links there), so the build
# installs this CPU torch instead of downloading the multi-GB CUDA one; removed again on exit.
wheel_copy=
cleanup() {
  podman rm -f "$NAME" >/dev/null 2>&1 || true
  if [ -n "$wheel_copy" ]; then rm -f "$wheel_copy"; fi
}
trap cleanup EXIT
torch_args=()  # none: the Dockerfile's own torch requirement, as a user's build gets it
if [ "$TORCH_WHEEL" = default ]; then
  IMAGE=localhost/quill:default
  step "building $IMAGE (the Dockerfile's default torch, from the package index)"
else
  wheel_copy=wheels/$(basename "$TORCH_WHEEL")
  cp "$TORCH_WHEEL" "$wheel_copy"
  torch_version=$(basename "$TORCH_WHEEL" | cut -d- -f2)  # torch-2.13.0+cpu-cp311-... -> 2.13.0+cpu
  torch_args=(--build-arg TORCH_REQUIREMENT="torch==$torch_version")
  step "building $IMAGE (torch==$torch_version)"
fi
started=$SECONDS
# --format docker: the OCI format has no HEALTHCHECK (nor SHELL), and Docker builds this format.
podman build --format docker --network=host --build-arg BASE_IMAGE="$BASE" "${torch_args[@]}" \
  --secret id=pipcert,src=/etc/ssl/certs/ca-certificates.crt -t "$IMAGE" . > "$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log"; exit 1; }
echo "built in $((SECONDS - started)) s; image size: $(podman image inspect "$IMAGE" --format '{{.Size}}') bytes"

step "running it on port $PORT"
podman rm -f "$NAME" >/dev/null 2>&1 || true
echo "(errors about systemd healthcheck timers are expected here: there is no systemd)"
podman run -d --name "$NAME" --network=host -e QUILL_PORT="$PORT" "$IMAGE" >/dev/null
url=http://127.0.0.1:$PORT
echo "user in the container: $(podman exec "$NAME" id)"

started=$SECONDS
until curl -sf "$url/ready" >/dev/null; do
  if [ $((SECONDS - started)) -gt 300 ] || [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" != true ]; then
    echo "not ready; the container's log:"; podman logs "$NAME" | tail -n 40; exit 1
  fi
  sleep 2
done
echo "GET /ready after $((SECONDS - started)) s: $(curl -sf "$url/ready")"
podman healthcheck run "$NAME"  # no timers without systemd: run the image's HEALTHCHECK by hand
echo "HEALTHCHECK (python -m app.healthcheck): healthy"
curl -sf "$url/" | grep -q '<title>Quill playground</title>'
echo "GET /: the playground page"

step "POST /generate, streamed"
events=$(curl -sfN "$url/generate" -H 'Content-Type: application/json' \
  -d '{"prompt": "ROMEO:", "max_new_tokens": 60, "seed": 1}' | tr -d '\r')
tokens=$(grep -c '^event: token' <<< "$events" || true)
done_line=$(grep -A1 '^event: done' <<< "$events" | grep '^data:' || true)
echo "token events: $tokens"
echo "done event: ${done_line:0:400}"
[ "$tokens" -eq 60 ] && [ -n "$done_line" ] || { echo "FAILED: expected 60 token events and a done event"; exit 1; }

step "stopping: SIGTERM drains, exit code $(podman stop -t 40 "$NAME" >/dev/null; podman inspect -f '{{.State.ExitCode}}' "$NAME")"
echo "container smoke test passed"
