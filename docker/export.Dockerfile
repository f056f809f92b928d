# Export image: NeMo + torch (CPU build) to turn a Streaming Sortformer into the Triton repository.
# Export-time only: the server image (NGC tritonserver) never sees NeMo or torch.
#
# Build context: the repository root (only the requirement files are sent, see
# export.Dockerfile.dockerignore); the code (export/, sortformer_triton/, python_backend/) is mounted
# read-only by docker-compose.yml, so editing it needs no rebuild.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# libsndfile: NeMo's audio stack; build-essential: source-only dependencies of nemo_toolkit[asr]
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libsndfile1 \
    && rm -rf /var/lib/apt/lists/*

COPY requirements.txt requirements-export.txt /tmp/req/
# torch first, from PyTorch's CPU index (same version as requirements-export.txt), so that NeMo's
# dependency resolution keeps it instead of pulling the CUDA build (several GB).
RUN TORCH="$(grep -E '^torch==' /tmp/req/requirements-export.txt)" \
    && pip install "${TORCH}" --index-url https://download.pytorch.org/whl/cpu \
    && pip install -r /tmp/req/requirements.txt -r /tmp/req/requirements-export.txt \
    && pip check

# Non-root (uid 1000 like the NGC tritonserver image's triton-server user). /models and /cache are
# owned by it, so named volumes mounted there are created writable for it.
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin sortformer \
    && mkdir -p /models /cache /opt/sortformer \
    && chown 1000:1000 /models /cache
USER 1000:1000
ENV HOME=/home/sortformer \
    HF_HOME=/cache/huggingface \
    PYTHONPATH=/opt/sortformer
WORKDIR /opt/sortformer
CMD ["python", "docker/export_once.py", "--out", "/models"]
