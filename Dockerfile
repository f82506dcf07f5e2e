# sigil: a verifying OCI registry mirror.
#   docker build -t sigil .
#   docker build --build-arg PYTHON_IMAGE=python:3.12-slim-bookworm -t sigil .
#   docker run -p 5000:5000 -v sigil-data:/var/lib/sigil --read-only --tmpfs /tmp sigil
# The image runs as a non-root user with a read-only root file system: it writes only to the
# store volume (/var/lib/sigil) and /tmp. Guide: docs/deploy.md.

# Any CPython >= 3.11 image with `python -m venv` (Debian or Ubuntu based: `useradd`).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: the sigil wheel and the wheels of its dependencies -------------------------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# The extras: fleet (S3 + PostgreSQL backends) and airgap (.tar.zst archives), so one image
# runs every documented set-up.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels '.[fleet,airgap]'

# -- runtime: a venv installed from those wheels only (no compiler, no build tools) ---------------
FROM ${PYTHON_IMAGE} AS runtime
# A fixed non-root uid/gid owns the store; Kubernetes' runAsUser and fsGroup use the same.
RUN groupadd --system --gid 10001 sigil \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sigil \
       --shell /usr/sbin/nologin sigil \
    && mkdir -p /var/lib/sigil /etc/sigil \
    && chown sigil:sigil /var/lib/sigil
# --no-index: the runtime stage installs exactly what the builder resolved. Byte code is
# compiled now, as the read-only root cannot take __pycache__ at run time. The wheels are
# bind-mounted from the builder (BuildKit, the default builder since Docker 23), so they
# leave no layer behind.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/sigil \
    && /opt/sigil/bin/pip install --no-cache-dir --no-index --find-links /wheels 'sigil[fleet,airgap]' \
    && /opt/sigil/bin/python -m compileall -q /opt/sigil/lib
COPY config/ /etc/sigil/

ENV PATH=/opt/sigil/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIGIL_STORAGE_ROOT=/var/lib/sigil \
    TMPDIR=/tmp
USER 10001:10001
WORKDIR /var/lib/sigil
VOLUME ["/var/lib/sigil"]
EXPOSE 5000
# /healthz answers 200 while the process serves HTTP; standard library only.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4)"]
ENTRYPOINT ["sigil"]
CMD ["serve", "--config", "/etc/sigil/sigil.yaml"]
