# syntax=docker/dockerfile:1
# imgserve: the classification service with the shipped model.
#
#   docker build -t imgserve:gpu .                 # default target: CUDA (onnxruntime-gpu)
#   docker build -t imgserve:cpu --target cpu .    # CPU only, small
#   docker run --gpus all -p 8000:8000 imgserve:gpu
#   docker run -p 8000:8000 imgserve:cpu
#
# Base: python:3.11-slim with CUDA 13 and cuDNN 9 installed from pip (onnxruntime-gpu[cuda,cudnn],
# the nvidia-* wheels), not an nvidia/cuda:13-cudnn-runtime base. onnxruntime-gpu 1.31 needs
# exactly CUDA 13 + cuDNN 9; the pip wheels carry only the libraries it loads, while the CUDA
# runtime images also ship the whole toolkit runtime (about 1.5 GB more) and a second Python
# would have to be added to them. The host needs only the NVIDIA driver and container toolkit.
# Without a GPU, the same image falls back to the CPU provider quietly.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- 1. build the wheel (pure Python: no compiler needed) ----------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
RUN pip wheel --no-cache-dir --no-deps --disable-pip-version-check --wheel-dir /wheels .

# --- 2. virtual environments, installed by the same script the tests run -----------------------
# constraints.txt pins every package to the versions the tests passed with.
FROM ${PYTHON_IMAGE} AS venv-gpu
COPY deploy/install-venv.sh /usr/local/bin/install-venv
COPY constraints.txt /tmp/constraints.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    install-venv /opt/venv "$(ls /wheels/imgserve-*.whl)" gpu /tmp/constraints.txt

FROM ${PYTHON_IMAGE} AS venv-cpu
COPY deploy/install-venv.sh /usr/local/bin/install-venv
COPY constraints.txt /tmp/constraints.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    install-venv /opt/venv "$(ls /wheels/imgserve-*.whl)" cpu /tmp/constraints.txt

# --- 3. the runtime: no compilers, no torch, no training code, no data ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 imgserve \
    && useradd --system --uid 10001 --gid imgserve --no-create-home --shell /usr/sbin/nologin imgserve
COPY --chown=root:root --chmod=0444 models/fashion_mnist_seed_cnn.onnx /opt/imgserve/models/
# IMGSERVE_GRACEFUL_TIMEOUT_S fits inside `docker stop`'s default 10 s; Kubernetes sets its own
# (see deploy/k8s). Mount another model and point IMGSERVE_MODEL_PATH at it to serve yours.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IMGSERVE_HOST=0.0.0.0 \
    IMGSERVE_PORT=8000 \
    IMGSERVE_MODEL_PATH=/opt/imgserve/models/fashion_mnist_seed_cnn.onnx \
    IMGSERVE_GRACEFUL_TIMEOUT_S=8 \
    IMGSERVE_LOG_JSON=true
WORKDIR /opt/imgserve
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2)"]
ENTRYPOINT ["python", "-m", "service"]

FROM runtime AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv

FROM runtime AS gpu
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=venv-gpu /opt/venv /opt/venv
