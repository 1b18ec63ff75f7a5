#!/usr/bin/env bash
# Builds sifuse and shows the demo image (a busybox root filesystem inside a SIF): its SIF
# descriptors and superblock, then mounts it over FUSE, reads from the mount and unmounts.
# Mounting needs root (or fusermount3 from fuse3) and /dev/fuse; without them the demo
# reads the image directly instead.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/sifuse
img=fixtures/demo.sif
"$bin" inspect "$img"
echo
if [ -c /dev/fuse ] && { [ "$(id -u)" = 0 ] || command -v fusermount3 >/dev/null; }; then
  mnt=$(mktemp -d)
  trap '"$bin" umount "$mnt" 2>/dev/null || true; rmdir "$mnt"' EXIT
  "$bin" mount "$img" "$mnt"
  echo "mounted $img on $mnt:"
  grep " $mnt " /proc/self/mountinfo
  ls -l "$mnt" "$mnt/bin" | head -20
  cat "$mnt/etc/os-release"
  "$bin" umount "$mnt"
  trap 'rmdir "$mnt"' EXIT
  echo "unmounted"
else
  echo "no /dev/fuse access here: reading the image directly"
  "$bin" ls -l "$img" /bin
  "$bin" cat "$img" /etc/os-release
fi
