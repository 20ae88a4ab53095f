# Kiln serving image: the default models are trained, exported and baked in at build time, so a pod
# starts serving in seconds with a read-only root filesystem (see k8s/).
#   docker build -t kiln:0.1.0 .
FROM python:3.11-slim
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
# to keep the image free of CUDA libraries. The gpu image adds `.[gpu]` on a CUDA base instead.
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install -c constraints.txt . \
 && kiln train vit-soft --export && kiln train vit-softmax --export && kiln train diffusion-digits --export \
 && kiln train forecaster-goog-daily --export && kiln train forecaster-eurusd-hourly --export \
 && groupadd -g 10001 kiln && useradd -u 10001 -g kiln -M -s /usr/sbin/nologin kiln \
 && chown -R kiln:kiln /var/lib/kiln
USER 10001
EXPOSE 3000 8001
CMD ["kiln", "serve", "--http-port", "3000", "--grpc-port", "8001", "--no-train"]
