# syntax=docker/dockerfile:1
# The funnel's server image, CPU: Python 3.11 and the venv from requirements.lock, installed by the
# Makefile's own `make venv`, so the image and a developer's .venv are the same install
# (tests/test_deployment_manifests.py checks it). The GPU variant is Dockerfile.gpu. Never built on
# the project's machines (no container runtime there): the tests check this file statically.
#
#   docker build -t merlin-funnel .
#   docker run --rm --shm-size=1g -p 127.0.0.1:8001:8001 -e FUNNEL_ADMIN_KEY \
#       -v "$PWD/build:/models:ro" merlin-funnel --host 0.0.0.0
#
# The server listens on 127.0.0.1 inside the container unless the command says --host 0.0.0.0
# (compose.yaml and deployment/kubernetes/ do; docs/deployment.md, docs/security.md).
FROM python:3.11-slim-bookworm

# make runs the install step; libgomp1 is OpenMP for faiss and TensorFlow, libexpat1 a library the
# Python backend stub links (the slim image may drop it).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends make libgomp1 libexpat1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# What `make venv` reads (the lock, pyproject.toml and the README its metadata names), then the
# packages `pip install -e .` finds and what the server and its tools run.
COPY Makefile pyproject.toml requirements.lock README.md ./
COPY configs/ configs/
COPY workflows/ workflows/
COPY models/ models/
COPY serving/ serving/
COPY deployment/ deployment/
COPY evaluation/ evaluation/
COPY online/ online/
COPY benchmarks/ benchmarks/
COPY scripts/ scripts/
COPY triton_repo/ triton_repo/
COPY monitoring/ monitoring/

# The install step: the Makefile's venv target, nothing else. The cache mount keeps pip's wheels
# between builds, so a code change reinstalls from the cache instead of the network.
RUN --mount=type=cache,target=/root/.cache/pip make venv PYTHON=python3.11

# Not root. The folder holding the model repository is mounted read-only at /models (the repository
# is /models/triton_repo; a mount of the repository folder itself would keep the old folder, deleted
# and empty, after export_triton.py --replace); what the server writes (the feedback log and the live
# store, unless a deployment points them at PostgreSQL) goes to /var/lib/funnel, never beside the
# repository, and the admin key comes from FUNNEL_ADMIN_KEY.
RUN useradd --system --uid 10001 --home-dir /tmp --shell /usr/sbin/nologin funnel \
    && mkdir -p /models /var/lib/funnel && chown funnel /models /var/lib/funnel
USER 10001
ENV PYTHONUNBUFFERED=1 \
    FUNNEL_FEEDBACK_LOG=/var/lib/funnel/feedback.sqlite \
    FUNNEL_STORE_URL=/var/lib/funnel/live.sqlite

# HTTP, gRPC, metrics: scripts/serve.py's defaults.
EXPOSE 8000 8001 8002

# The deep probe: one real request through every stage, then every Python model instance's stub where
# the admin key is available (else skipped with a note; docs/deployment.md). The start period covers
# the server's wait for its models (up to 420 s).
HEALTHCHECK --interval=30s --timeout=15s --start-period=420s --retries=3 \
    CMD ["/app/.venv/bin/python", "/app/scripts/probe.py", "--url", "127.0.0.1:8001"]

ENTRYPOINT ["/app/.venv/bin/python", "/app/scripts/serve.py"]
CMD ["--model-repository", "/models/triton_repo"]
