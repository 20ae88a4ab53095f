# Kiln serving images. The default models are trained, exported (ONNX + int8, quality-gated) and baked into
# the model store at build time, so a pod starts serving in seconds with a read-only root filesystem (k8s/).
#   docker build -t kiln:0.1.0 .                          CPU image (onnxruntime)
#   docker build --target gpu -t kiln:0.1.0-gpu .         GPU image: + CUDA torch, onnxruntime-gpu, TensorRT
# TensorRT engines are not built here (a build machine's GPU is not the serving GPU): the GPU overlay's init
# container builds them on the pod's own GPU with `kiln export --format fp16-trt` (k8s/overlays/gpu).
# The build context is checked by tests/unit/test_k8s.py (every COPY source exists; user, ports and
# KILN_HOME match the manifests).
FROM python:3.11-slim AS cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 KILN_HOME=/var/lib/kiln
WORKDIR /opt/kiln
COPY pyproject.toml constraints.txt README.md ./
COPY kiln kiln
COPY model_zoo model_zoo
COPY training training
COPY export export
COPY serving serving
COPY benchmarks benchmarks
# torch is pinned (constraints.txt); pass PIP_EXTRA_INDEX_URL=<PyTorch's CPU wheel index> as a build arg
# to keep the CPU image free of CUDA libraries.
ARG PIP_EXTRA_INDEX_URL=""
# `kiln prepare` with no names trains and exports every default model (kiln.settings.DEFAULT_MODELS: the
# vision, generation, forecasting and retrieval families' models, which the agent family reuses), so every
# family the manifests deploy finds its models in the store (tests/unit/test_k8s.py checks the list).
RUN pip install -c constraints.txt . \
 && kiln prepare \
 && groupadd -g 10001 kiln && useradd -u 10001 -g kiln -M -s /usr/sbin/nologin kiln \
 && chown -R kiln:kiln /var/lib/kiln
USER 10001
EXPOSE 3000 8001
CMD ["kiln", "serve", "--http-port", "3000", "--grpc-port", "8001", "--no-train"]

# GPU: the same store and code, plus the `gpu` extra (tensorrt, onnxconverter-common), onnxruntime-gpu in
# place of the CPU onnxruntime (they install the same module), and the CUDA build of the pinned torch (the
# TensorRT runtime keeps its buffers in torch CUDA tensors). The NVIDIA driver comes from the node.
FROM cpu AS gpu
USER root
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install -c constraints.txt '.[gpu]' \
 && pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu \
 && pip install --force-reinstall --no-deps --index-url "$TORCH_CUDA_INDEX" "$(pip freeze | grep '^torch==')"
USER 10001
