#!/usr/bin/env bash
# Builds sifuse and shows the demo image (a busybox root filesystem inside a SIF):
# its SIF descriptors and superblock, a listing, and a file read straight from it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/sifuse
img=fixtures/demo.sif
set -x
"$bin" inspect "$img"
"$bin" ls -l "$img" /bin
"$bin" cat "$img" /etc/os-release
