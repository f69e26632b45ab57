# The project as one image: `drl` (aggregator, topics, demo, smoke) and the demo app server
# (`python -m aggregator.demo_server`). Used by docker-compose.yml (`build: .`).
#   docker build -t drl .
#   docker run --rm drl aggregator run --kafka-bootstrap kafka:9092 --limit "200 per 10 seconds"
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs (pyproject's `readme` names README.md). confluent-kafka,
# numpy and lz4 come as binary wheels; gcc is installed for the compiled request path
# (setup.py, limiter/_requestpath.c) and removed again, with the sources, after the
# (non-editable) install.
COPY pyproject.toml setup.py README.md /tmp/src/
COPY limiter /tmp/src/limiter
COPY producer /tmp/src/producer
COPY aggregator /tmp/src/aggregator
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install "/tmp/src[web]" \
    && python -c "from limiter import compiled; assert compiled.built()" \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
    && rm -rf /tmp/src \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /app \
        --shell /usr/sbin/nologin drl

USER 10001:10001
WORKDIR /app

# /healthz, /readyz, /metrics of `drl aggregator run --http-host 0.0.0.0`; the demo app server.
EXPOSE 9464 8000

ENTRYPOINT ["drl"]
CMD ["--help"]
