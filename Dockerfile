# The serving image: ONNX Runtime serves, so no PyTorch here (training happens elsewhere).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/latent-stream
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY operators ./operators
COPY frontend_bridge ./frontend_bridge
COPY benchmarks ./benchmarks
RUN pip install . && useradd --system --create-home latent-stream && mkdir -p /data && chown latent-stream /data
USER latent-stream
EXPOSE 8765
ENTRYPOINT ["latent-stream"]
CMD ["serve", "--data-dir", "/data"]
