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
# numpy and lz4 come as binary wheels, so no compiler is installed. The sources are removed
# after the (non-editable) install.
COPY pyproject.toml README.md /tmp/src/
COPY limiter /tmp/src/limiter
COPY producer /tmp/src/producer
COPY aggregator /tmp/src/aggregator
RUN pip install "/tmp/src[web]" \
    && rm -rf /tmp/src \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /app \
        --shell /usr/sbin/nologin drl

USER 10001:10001
WORKDIR /app

# /healthz, /readyz, /metrics of `drl aggregator run --http-host 0.0.0.0`; the demo app server.
EXPOSE 9464 8000

ENTRYPOINT ["drl"]
CMD ["--help"]
