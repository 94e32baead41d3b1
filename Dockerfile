# syntax=docker/dockerfile:1.7
# The kvfleet image: the operator (`kvfleet operator`) and every dataplane role
# (`python -m kvfleet.dataplane.roles.<role> --config /etc/kvfleet/...`), one image.
#
#   docker build -t kvfleet:dev .                                   # CPU torch (small; kind/e2e)
#   docker build -t kvfleet:cu124 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
#
# Runs as a non-root user (uid 10001, matching the pods' securityContext) with a
# read-only root filesystem: writable paths are /tmp and /var/cache/kvfleet
# (emptyDir volumes in the pods the operator creates).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONSAFEPATH=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY kvfleet ./kvfleet
COPY operator ./operator
COPY dataplane ./dataplane
RUN python -m pip wheel --no-deps -w /wheels .

FROM python:${PYTHON_VERSION}-slim AS runtime
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONSAFEPATH=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/kvfleet PATH=/opt/kvfleet/bin:$PATH \
    HOME=/tmp KVFLEET_CACHE=/var/cache/kvfleet
RUN python -m venv /opt/kvfleet \
 && pip install --index-url "${TORCH_INDEX}" torch \
 && groupadd --gid 10001 kvfleet \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kvfleet \
 && mkdir -p /var/cache/kvfleet && chown 10001:10001 /var/cache/kvfleet
COPY --from=build /wheels /wheels
RUN pip install "$(ls /wheels/kvfleet-*.whl)[engine]" && rm -rf /wheels \
 && python -c "import kvfleet.operator.main, kvfleet.dataplane.config"
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8080 4317 50051 50052
ENTRYPOINT []
CMD ["kvfleet", "operator"]
