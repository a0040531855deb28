# splitgate: multi-stage build. The runtime image is distroless (no shell), runs as
# non-root, and checks its own health through `splitgate health`.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY src ./src
COPY benches ./benches
COPY vendor ./vendor
RUN cargo build --release --locked --bin splitgate \
    && mkdir -p /out/state \
    && cp target/release/splitgate /out/splitgate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/splitgate /usr/local/bin/splitgate
COPY config/container.toml /etc/splitgate/splitgate.toml
COPY --from=build --chown=65532:65532 /out/state /var/lib/splitgate/state
WORKDIR /var/lib/splitgate
USER 65532:65532
# 8080: proxy. 9901: admin API and /metrics on all interfaces; it refuses to start
# unless SPLITGATE_ADMIN_TOKEN is set, and every change needs that token.
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/splitgate", "health", "--admin", "http://127.0.0.1:9901"]
ENTRYPOINT ["/usr/local/bin/splitgate"]
CMD ["run", "-c", "/etc/splitgate/splitgate.toml"]
