#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what scripts/gpu-check.sh needs on the device machine and the GPU image lacks:
# wheels for CPython 3.12 on manylinux x86_64 of Quill's runtime and test dependencies that are not in that
# image (/work/.library/device/KINDS.md lists what is), each at the version this checkout's .venv holds, and
# a copy of Tiny Shakespeare for the val-loss row when ../shared/data has it (never committed: .whl is ignored).
# Run here, where pip reaches the index: bash scripts/gpu-wheels.sh   (about 10 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}

# pyproject's dependencies and pytest/httpx/openai, less what the image has (torch, numpy, click, jinja2,
# tokenizers, safetensors, prometheus-client, pyyaml, requests, tqdm, uvloop, ...), plus what these require
# that it lacks. Some it has are carried anyway at the versions pinned here, since those above need recent
# ones (typing-extensions, annotated-doc, anyio, idna), and h11 with the httpx and httpcore that work with it.
PACKAGES=(
  fastapi fastapi-offline starlette annotated-doc opentelemetry-api typing-extensions anyio idna
  pydantic pydantic-core annotated-types typing-inspection
  pydantic-settings python-dotenv
  sse-starlette uvicorn httptools h11 httpx httpcore
  gguf
  openai httpx2 httpcore2 truststore jiter sniffio
)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

frozen=$("$PIP" freeze | tr 'A-Z_' 'a-z-')
rm -rf .whl
mkdir -p .whl
pins=()
for name in "${PACKAGES[@]}"; do
  version=$(sed -n "s/^$name==//p" <<<"$frozen")
  if [ -z "$version" ]; then
    echo "gpu-wheels: $name is not installed in $PIP's environment (make install first)" >&2
    exit 1
  fi
  pins+=("$name==$version")
done
# pip matches each manylinux tag exactly: these cover the wheels of every package above.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_24 manylinux_2_31; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"

corpus=../shared/data/tinyshakespeare.txt
[ -f "$corpus" ] && cp "$corpus" .whl/tinyshakespeare.txt
ls .whl
echo "gpu-wheels: $(find .whl -name '*.whl' | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
