# syntax=docker/dockerfile:1
# Build: docker build -t runpod-autoscaler .
FROM rust:1.90-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches
# No `emulator` feature: the image has neither the emulator nor its unauthenticated admin API.
RUN cargo build --release --locked --no-default-features --bin runpod-autoscaler

FROM debian:bookworm-slim
# libssl3: librdkafka (built into the binary) links the system OpenSSL for Kafka TLS/SCRAM.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates=20230311* libssl3=3.0.* \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/runpod-autoscaler /usr/local/bin/runpod-autoscaler
# Unprivileged, numeric (works with runAsNonRoot).
USER 65532:65532
# 9090: KEDA external scaler (gRPC); 8080: /metrics /healthz /readyz /debug/plan.
EXPOSE 9090 8080
ENTRYPOINT ["/usr/local/bin/runpod-autoscaler"]
CMD ["serve", "--config", "/etc/runpod-autoscaler/config.toml"]
