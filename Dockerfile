# One image for every chatpipe service; compose.yaml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY chatpipe chatpipe
COPY pipeline pipeline
COPY workers workers
COPY web web
COPY migrations migrations
# gcc and the C library headers build the engine's CPU kernels on first use.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
# The CPU build of torch; pip would otherwise resolve the pinned version to a CUDA build.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir -e .
ENV CHATPIPE_HOME=/data HF_HUB_OFFLINE=1
