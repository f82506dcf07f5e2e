# sigil: a verifying OCI registry mirror.
# Build: docker build -t sigil .    Run: docker run -p 5000:5000 -v sigil-data:/var/lib/sigil sigil
FROM python:3.11-slim-bookworm

# A fixed non-root user owns the store; the process never needs root.
RUN useradd --system --uid 10001 --home-dir /var/lib/sigil --shell /usr/sbin/nologin sigil \
    && mkdir -p /var/lib/sigil /etc/sigil \
    && chown sigil:sigil /var/lib/sigil

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip install --no-cache-dir . && rm -rf /src
COPY config/ /etc/sigil/

USER sigil
WORKDIR /var/lib/sigil
VOLUME ["/var/lib/sigil"]
EXPOSE 5000
ENV SIGIL_STORAGE_ROOT=/var/lib/sigil
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4)"]
ENTRYPOINT ["sigil", "serve", "--config", "/etc/sigil/sigil.yaml"]
