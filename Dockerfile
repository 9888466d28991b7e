# syntax=docker/dockerfile:1
#
# liqmon service image:  docker build -t liqmon:latest .
# Runs `liqmon run`; configure it with LIQMON_* environment variables (see deploy/README.md).

# -- stage 1: build the wheel ---------------------------------------------------------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# Only what the wheel is built from (README.md is the package's long description), so that
# edits to tests or deploy files do not invalidate this layer.
COPY pyproject.toml README.md ./
COPY monitor ./monitor
RUN pip wheel --no-deps -w /dist .

# -- stage 2: runtime -------------------------------------------------------------------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="liqmon" \
      org.opencontainers.image.description="Streaming cross-margin liquidation monitor for Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"

# OPENBLAS_NUM_THREADS=1: numpy's OpenBLAS would otherwise start a thread (and buffers) per host
# CPU, not per CPU of the container's limit; liqmon does element-wise maths, not BLAS.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OPENBLAS_NUM_THREADS=1

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER, and a stable
# id keeps file ownership predictable across rebuilds.
RUN groupadd --system --gid 10001 liqmon \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin liqmon

# The wheel is bind-mounted from the build stage (BuildKit, the default builder) rather than
# copied, so it leaves no layer behind. Runtime dependencies only: the `broker` extra (the
# embedded development broker) is not installed.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-cache-dir /dist/*.whl

# The compiled kernels (numba: valuation, band filing, the restore's batch parsing) compile
# once, here, into a cache the runtime user can only read: a container then loads them in under
# a second instead of compiling them for about a minute. numba caches only where it can write,
# so at start liqmon copies this cache into its temporary directory (~7 MB in /tmp, a writable
# emptyDir under Kubernetes) and loads from the copy (monitor/compiled.py). numba keys compiled
# code by the CPU it was compiled for: code for the build machine's own CPU model would not be
# used on nodes with another, which would then compile at every start. Compiled for the
# architecture's generic CPU, it is used on every node of that architecture; the valuation of
# 100,073 accounts measured the same either way (within noise, 2026-12-06).
ENV NUMBA_CACHE_DIR=/var/cache/liqmon-numba NUMBA_CPU_NAME=generic
RUN python -c "from monitor.service.runner import warm_up_kernels as w; print(f'kernels compiled in {w():.1f} s')" \
 && chmod -R a+rX /var/cache/liqmon-numba

# A default risk config so the image starts as is; deployments mount their own over it
# (docker-compose: a bind mount; Kubernetes: a ConfigMap at /etc/liqmon).
COPY examples/risk.toml /etc/liqmon/risk.toml
ENV LIQMON_CONFIG=/etc/liqmon/risk.toml

USER 10001:10001

# /metrics, /healthz, /readyz
EXPOSE 9464

# slim has no curl. Liveness only (/healthz): readiness (/readyz) is the orchestrator's business,
# and restoring a large state must not mark the container unhealthy. Follows LIQMON_METRICS_PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LIQMON_METRICS_PORT', '9464'), timeout=4)"]

# SIGTERM (Docker's and Kubernetes' default) triggers the graceful stop: flush, checkpoint, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["liqmon"]
CMD ["run"]
