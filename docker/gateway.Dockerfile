# Web gateway image: the client library's dependencies only (no NeMo, no torch, no server).
# Build context: the repository root (only requirements.txt is sent, see gateway.Dockerfile.dockerignore);
# clients/ and sortformer_triton/ are mounted read-only by docker-compose.yml.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.txt /tmp/req/requirements.txt
RUN pip install -r /tmp/req/requirements.txt && pip check

RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin gateway && mkdir -p /opt/sortformer
USER 1000:1000
ENV HOME=/home/gateway \
    PYTHONPATH=/opt/sortformer
WORKDIR /opt/sortformer
CMD ["python", "-m", "clients.gateway"]
