# One image for every clientsync process: receiver, worker, sandbox, Flower-compatible Celery.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends gcc make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
RUN pip install '.[flower]' && useradd --system clientsync
USER clientsync
EXPOSE 8080
CMD ["clientsync", "serve", "--host", "0.0.0.0"]
