# ember on CPU. Build:  docker build -t ember .
# CUDA:  docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t ember:cuda .
# Any Debian/Ubuntu image with python3 (>= 3.10) and python3-venv works as BASE; scripts/container_check.sh
# builds one from Debian packages when Docker Hub is out of reach.
ARG BASE=python:3.11-slim
FROM ${BASE}

# Where pip finds torch 2.13: the CPU wheel index by default; empty to take it from PyPI or PIP_FIND_LINKS.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Extra wheel locations for offline or mirrored builds (pip reads these from the environment).
ARG PIP_FIND_LINKS=
ARG PIP_INDEX_URL=https://pypi.org/simple

# gcc builds ember's native CPU kernels for the CPU the container runs on (at the first model load).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN (command -v python3 || ln -s "$(command -v python)" /usr/local/bin/python3) \
    && python3 -m venv /opt/ember \
    && /opt/ember/bin/pip install --no-cache-dir -q --upgrade pip \
    && /opt/ember/bin/pip install --no-cache-dir -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch==2.13.0

COPY pyproject.toml README.md /src/
COPY ember /src/ember
RUN /opt/ember/bin/pip install --no-cache-dir -q /src && rm -rf /src

RUN useradd --create-home --uid 10001 ember && mkdir -p /models && chown ember:ember /models
USER ember
ENV PATH=/opt/ember/bin:$PATH \
    EMBER_HOME=/models \
    EMBER_CACHE=/models/.cache \
    EMBER_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/models"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('EMBER_PORT', '8080'), timeout=4)"
ENTRYPOINT ["ember"]
CMD ["serve"]
