# The image `cargo xtask image` builds, where a Docker daemon exists (deploy/README.md, "Image"):
#
#   docker build -t ghcr.io/ambit-mesh/ambit:latest .
#
# The build stage runs the same task with --binaries-only: every binary of the workspace (the agent
# `ambit`, and the CNI plugin `ambit-cni` once it exists) built fully static, each checked to need
# no loader and no shared library. The task installs what the kernel programs need itself (the
# nightly toolchain's rust-src and bpf-linker, through rustup and cargo). The image is those
# binaries alone: the agent executes no other program.

# The Rust release the workspace builds with (Cargo.toml), on Debian 12, whose static glibc links it.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask image --binaries-only /out

FROM scratch
COPY --from=build /out/ /usr/local/bin/
ENV PATH=/usr/local/bin
WORKDIR /
# The DaemonSet states the user too (runAsUser: 0): root for bpffs pins and other pods' namespaces.
USER 0:0
ENTRYPOINT ["/usr/local/bin/ambit"]
