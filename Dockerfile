# syntax=docker/dockerfile:1
# Quill's HTTP service: `python -m app` on port 8000, serving the bundled checkpoints.
#
# GPU by default: on Linux, the default index's torch wheel is the CUDA build, and it brings
# its own CUDA libraries, so a plain Debian base serves; the host needs only the NVIDIA driver
# and container toolkit (docker-compose.yml reserves the GPU). A CPU image, for example:
#   docker build --build-arg TORCH_REQUIREMENT=torch==2.13.0+cpu -t quill:cpu .
# with the CPU wheel put in wheels/ (scripts/container-smoke.sh does this) or an index that has it.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE}

# Installed with the other dependencies, where it also meets their "torch>=2.3".
ARG TORCH_REQUIREMENT=torch==2.13.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    QUILL_HOST=0.0.0.0 \
    QUILL_PORT=8000

# Debian's Python 3.11 (bookworm). Versions unpinned on purpose: the suite's security updates
# should reach each rebuild, and a pinned version disappears from the mirrors when replaced.
# g++ and python3-dev: the decode step compiles in the background at start-up (model/compiled.py), with g++ on a
# CPU, and on CUDA Triton builds its launcher against Python.h; `train --compile` needs them too. They add about
# 290 MB (apt's Installed-Size of the 47 packages they bring), beside about 5 GB of the CUDA torch wheel.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --gid 10001 quill \
    && useradd --create-home --uid 10001 --gid quill quill

WORKDIR /app

# Dependencies before the code, so that editing the code does not reinstall them. The CA
# bundle arrives as a build secret (a proxy's certificate, where one is needed) and is not kept.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pipcert \
    --mount=type=bind,source=wheels,target=/wheels \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi \
    && python -c 'import os, tomllib; project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
                  print(os.environ["TORCH_REQUIREMENT"], *project["dependencies"], sep="\n")' > /tmp/requirements.txt \
    && pip install --find-links /wheels -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY model/ model/
COPY train/ train/
COPY app/ app/
COPY checkpoints/ checkpoints/

# Other checkpoints (trained by the compose `train` service, or your own) live in this volume;
# serve them with QUILL_CHECKPOINTS=/checkpoints/NAME. /compiled holds compose's volume of compiled
# decode steps. Made here so that a new volume mounted on either belongs to quill.
RUN mkdir /checkpoints /compiled && chown quill:quill /checkpoints /compiled
VOLUME /checkpoints

USER 10001:10001
EXPOSE 8000

# /ready is 503 while the models load and once SIGTERM starts draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["python", "-m", "app.healthcheck"]

# Exec form: python is PID 1 and gets SIGTERM itself, drains the streams in flight, exits 0.
CMD ["python", "-m", "app"]
