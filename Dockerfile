# syntax=docker/dockerfile:1
#
# The sidecar as a small, non-root container image.
#
#   docker build -t ghcr.io/example/sidecar:0.1.0 .
#   docker run --rm -p 4180:4180 -e SIDECAR_... ghcr.io/example/sidecar:0.1.0
#
# Stage 1 builds wheels for the sidecar and all its dependencies; stage 2
# installs only those wheels (no compiler, no build tools, no pip cache) and
# runs as an unprivileged numeric user, so it also works with
# runAsNonRoot and a read-only root filesystem (see deploy/kubernetes).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build ----
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is built from (README* and LICENSE* may be absent).
COPY pyproject.toml README* LICENSE* ./
COPY sidecar ./sidecar

# The sidecar's wheel plus a wheel of every dependency, all in /wheels.
RUN pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------- final ----
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="OAuth2 / OpenID Connect authentication proxy" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_HTTP_ADDRESS=0.0.0.0:4180

# Install from the build stage's wheels only (bind-mounted, so they do not
# end up in a layer). pip compiles the .pyc files now, at build time; at run
# time nothing is written.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/sidecar-*.whl \
 && groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sidecar

# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp

# 4180: proxy and /oauth2/*; 9180: /metrics when SIDECAR_METRICS_ADDRESS is set.
EXPOSE 4180 9180

# SIGTERM starts a graceful shutdown (SIDECAR_SHUTDOWN_TIMEOUT).
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar"]
