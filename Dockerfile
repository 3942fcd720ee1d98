# autotune's image for the in-cluster CronJob (cluster/autotune):
#   docker build -t REGISTRY/autotune:0.1.0 .        (PostgreSQL storage: --build-arg EXTRA_PIP=psycopg2-binary)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG EXTRA_PIP=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY autotune ./autotune
RUN pip install . ${EXTRA_PIP} && rm -rf /src

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/autotune --shell /usr/sbin/nologin autotune \
    && mkdir -p /var/lib/autotune \
    && chown autotune:autotune /var/lib/autotune

USER 10001:10001
WORKDIR /var/lib/autotune
# Kubernetes stops the container with this signal: autotune treats it like Ctrl-C (stops the load,
# restores the baseline, leaves the study resumable).
STOPSIGNAL SIGINT
ENTRYPOINT ["autotune"]
CMD ["--help"]
