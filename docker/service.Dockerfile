# Courier service image: ONE Dockerfile for the three services (the uv monorepo way: a build
# argument names the workspace package). Build from the repository root, which is the context:
#
#   DOCKER_BUILDKIT=1 docker build -f docker/service.Dockerfile \
#       --build-arg PACKAGE=user-service --build-arg HTTP_PORT=8000 -t courier/user-service .
#
# (notification-service: 8001, dlq-archiver: 8002; `make images` builds all of them.) PACKAGE
# is the name of a folder under services/ and of its console script. Only the workspace
# members the service imports go into the image: courier-common and the service.
#
# No `# syntax=` line: BuildKit's built-in Dockerfile frontend supports RUN --mount, and a
# syntax line would make it fetch a frontend image from a registry first.
#
# Behind a TLS-inspecting proxy, hand uv the machine's CA bundle as a build secret (it trusts
# its own bundled roots, not the system's): --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
# The secret is mounted for the uv steps only and is never written to a layer.

# Pinned by tag. A digest (python:3.11-slim-bookworm@sha256:...) pins harder, but it has to be
# read from the registry: set it here (or with --build-arg PYTHON_IMAGE=...) when a registry is
# at hand. Both stages use the same image, so the interpreter the venv was built against is
# the one that runs it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# uv pinned to one release (the one every Courier image uses).
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

# ---- builder: the locked dependencies, then the service and courier-common as wheels ----
FROM ${PYTHON_IMAGE} AS builder

ARG PACKAGE

COPY --from=uv /uv /uvx /bin/

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app

# Dependencies first, so this layer is rebuilt only when the lock or a member's metadata
# changes. uv reads every workspace member's pyproject.toml to check the lock (metadata only,
# no source); the sync installs only what PACKAGE needs.
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/
COPY libs/testing/pyproject.toml libs/testing/
COPY services/user-service/pyproject.toml services/user-service/
COPY services/notification-service/pyproject.toml services/notification-service/
COPY services/dlq-archiver/pyproject.toml services/dlq-archiver/
COPY tools/sinks/pyproject.toml tools/sinks/
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle,target=/run/secrets/ca-bundle \
    if [ -z "$PACKAGE" ] || [ ! -f "services/$PACKAGE/pyproject.toml" ]; then \
        echo "--build-arg PACKAGE=<service> must name a folder under services/ (got '$PACKAGE')" >&2; \
        exit 2; \
    fi; \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi; \
    uv sync --locked --no-dev --package "$PACKAGE" --no-install-workspace

# Then the code of the members PACKAGE imports, installed as wheels (not editable), so the
# runtime stage needs nothing but the venv.
COPY libs/common/src libs/common/src
COPY services/${PACKAGE}/src services/${PACKAGE}/src
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle,target=/run/secrets/ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi; \
    uv sync --locked --no-dev --package "$PACKAGE" --no-editable \
    && ln -s "$PACKAGE" /app/.venv/bin/courier-service

# ---- runtime: the venv on the same slim base, run as a fixed non-root UID ----
FROM ${PYTHON_IMAGE} AS runtime

ARG PACKAGE
ARG HTTP_PORT

LABEL org.opencontainers.image.title="courier-${PACKAGE}" \
      org.opencontainers.image.description="Courier ${PACKAGE} (charts/courier runs it; see README.md)"

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it and volumes can be
# owned by it. No home directory, no login shell.
RUN if [ -z "$HTTP_PORT" ]; then \
        echo "--build-arg HTTP_PORT=<port> is required (the service's COURIER_HTTP_PORT)" >&2; \
        exit 2; \
    fi; \
    groupadd --gid 10001 courier \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin courier

# Owned by root and read-only to the service: the code cannot be changed by the process.
COPY --from=builder /app/.venv /app/.venv

# Configuration is environment only; secrets (COURIER_AMQP_URL, COURIER_REDIS_URL, ...) come
# from a Kubernetes Secret at run time, never from the image.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    COURIER_HTTP_HOST=0.0.0.0 \
    COURIER_LOG_FORMAT=json

WORKDIR /app
USER 10001:10001
EXPOSE ${HTTP_PORT}

# courier-service is a link to PACKAGE's console script (exec form: it is PID 1 and gets
# SIGTERM). The chart names the script itself as the container command.
# No HEALTHCHECK: Kubernetes probes call /healthz and /readyz (see charts/courier).
ENTRYPOINT ["courier-service"]
