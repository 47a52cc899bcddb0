# syntax=docker/dockerfile:1
# ferry's container image.
#
# From source (the default): a `--locked` release build in a Rust image, copied into a
# Debian slim runtime.
#   docker build -t ferry .
# From a binary built outside (for machines that cannot pull the Rust image): put it in
# dist/ and select the prebuilt stage; the Rust image is then never pulled.
#   docker build --build-arg FERRY_SOURCE=prebuilt --build-arg FERRY_BINARY=dist/ferry -t ferry .
# RUNTIME_IMAGE picks another Debian-based runtime (one without CA certificates gets them
# from apt at build time).

# The current stable Rust on Debian bookworm (the runtime's glibc); pin a version for repeatable builds.
ARG RUST_IMAGE=rust:1-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG FERRY_SOURCE=source

FROM ${RUST_IMAGE} AS binary-source
# librdkafka (the kafka feature) is built from source: it needs make besides the C compiler.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Every backend and audit output by default; e.g. FERRY_FEATURES=sqs,mimalloc for a smaller binary.
ARG FERRY_FEATURES=sqs,amqp,kafka,audit-s3,audit-firehose,mimalloc
RUN cargo build --release --locked -p ferry-bin --no-default-features --features "${FERRY_FEATURES}" \
 && install -D -m 0755 target/release/ferry /out/ferry

FROM ${RUNTIME_IMAGE} AS binary-prebuilt
ARG FERRY_BINARY=dist/ferry
COPY ${FERRY_BINARY} /out/ferry

# hadolint ignore=DL3006
FROM binary-${FERRY_SOURCE} AS binary

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="ferry" \
      org.opencontainers.image.description="Message bridge: broker to HTTP POST, acknowledged only after a 2xx" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"
# CA certificates for HTTPS endpoints and brokers; a runtime image that has them needs no apt.
# hadolint ignore=DL3008
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --no-log-init --no-create-home --uid 10001 --user-group --home-dir /var/lib/ferry --shell /usr/sbin/nologin ferry \
 && install -d -o 10001 -g 10001 /var/lib/ferry /etc/ferry \
 && ln -s /etc/ferry /var/lib/ferry/config
COPY --from=binary --chmod=0755 /out/ferry /usr/local/bin/ferry
# `ferry run` reads the layered tree config/ relative to its working directory, which
# links to /etc/ferry: /etc/ferry/config.toml, /etc/ferry/{ENV}/config.toml and
# /etc/ferry/{ENV}/{SCOPE}.config.toml. Relative paths (e.g. an audit file) land here.
WORKDIR /var/lib/ferry
# Numeric, so that Kubernetes can check runAsNonRoot.
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["ferry"]
CMD ["run"]
