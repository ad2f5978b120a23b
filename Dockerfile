# specfleet serving image: CUDA + Python, the package installed from pyproject.toml, and what
# KubeRay needs in a Ray container (bash, wget for its probes, `ray` on PATH). Referenced by the
# Helm chart's image.repository / image.tag (helm/specfleet/values.yaml).
#
#   docker build -t ghcr.io/specfleet/specfleet:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu129 \
#                --build-arg CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04 -t specfleet:cu129 .
#
# The CUDA libraries come with the torch wheel (nvidia-* packages), so a small CUDA "base" image
# is enough; the node's driver must support the wheel's CUDA (CUDA 13 wheels: driver >= 580,
# which Blackwell Ultra / B300 nodes need anyway).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TORCH_SPEC="torch>=2.8"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SPECFLEET_CACHE=/models

# Python 3.12 from Ubuntu 24.04; wget/curl for KubeRay's probes and debugging; tini as PID 1.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev build-essential \
      bash wget curl ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV" \
 && pip install --upgrade pip setuptools wheel

# torch first, from the CUDA wheel index (a plain `pip install torch` may pick another build).
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

# Dependencies from pyproject.toml only, so code edits do not invalidate this layer.
WORKDIR /opt/specfleet
COPY pyproject.toml ./
RUN python3 - <<'PY' > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(d for d in project["dependencies"] if not d.startswith("torch")))
PY

# The package itself. Editable on purpose: the bundled demo drafter lives in models/ at the
# repository root, where workers/hub.py looks for it.
COPY . .
RUN pip install --no-deps -e . \
 && python3 -c "import orchestrator.app, workers.engine.params, cluster.planning.planner, ray; print('ray', ray.__version__)"

# Run as uid 1000 (the base image's `ubuntu` user; Ray's own images also use uid 1000): it owns
# the model cache and state mount points and can write /tmp/ray.
RUN mkdir -p /models /var/lib/specfleet \
 && chown -R 1000:1000 /models /var/lib/specfleet /opt/specfleet
USER 1000
EXPOSE 8000 8265 6379 10001 8080
ENTRYPOINT ["/usr/bin/tini", "--"]
# KubeRay replaces the command with `ray start ...`; standalone, the image serves the embedded stack:
CMD ["specfleet", "serve", "--help"]
