# pneumoscan web service: inference only (ONNX Runtime, no PyTorch).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY models ./models
RUN pip install -e '.[serve,postgres]' && useradd --create-home --uid 10001 pneumoscan && mkdir /data && chown pneumoscan /data
USER pneumoscan
# Every address of the container: the service refuses to start without PNEUMOSCAN_API_KEY (or PNEUMOSCAN_API_KEY_FILE).
ENV PNEUMOSCAN_HOST=0.0.0.0 PNEUMOSCAN_PORT=8000 PNEUMOSCAN_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["pneumoscan", "serve"]
