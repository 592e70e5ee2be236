# paratrain: one image for the server and the workers (docker-compose.yml runs both).
# CUDA comes with the torch wheel; the host needs the NVIDIA driver and the NVIDIA Container Toolkit.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false \
    PARATRAIN_DATA_DIR=/data PARATRAIN_CACHE=/data/cache

# torch first, from the index that matches the host's CUDA driver (an unpinned torch from PyPI works too,
# but pulls whatever CUDA build is current).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cu128"
RUN pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/paratrain
COPY pyproject.toml README.md ./
COPY paratrain ./paratrain
COPY trainer_core ./trainer_core
COPY server ./server
COPY worker ./worker
COPY ui ./ui
RUN pip install . && python -c "import torch, transformers, peft, fastapi, gradio, server.main, worker.agent"

VOLUME ["/data"]
EXPOSE 8000
CMD ["paratrain", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
