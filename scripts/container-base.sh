#!/usr/bin/env bash
# Makes a Debian slim base image for the ferry image without pulling from a container
# registry: debootstrap a minimal bookworm (with CA certificates) from Debian's packages
# into a folder and import it as an image. Skips all of it when the image exists.
#   scripts/container-base.sh [IMAGE]     default: localhost/debian-slim:bookworm
set -euo pipefail
IMAGE="${1:-localhost/debian-slim:bookworm}"
if podman image exists "$IMAGE"; then
  echo "base image $IMAGE exists"
  exit 0
fi
ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm into a temporary folder (a few minutes)..."
debootstrap --variant=minbase --include=ca-certificates bookworm "$ROOTFS" >"$ROOTFS.log" 2>&1 \
  || { tail -20 "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
# What a slim image leaves out: package lists and caches, docs and man pages.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/usr/share/doc/* \
  "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
tar -C "$ROOTFS" -c . | podman import --change 'CMD ["bash"]' - "$IMAGE"
echo "base image $IMAGE imported"
