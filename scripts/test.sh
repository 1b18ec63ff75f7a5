#!/usr/bin/env bash
# The whole test suite, as a new user and CI run it: installs the system packages the tests
# need when they are missing, then checks formatting and lints and runs every test.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -E 'test(extract)'   # extra arguments go to cargo nextest (or cargo test)
#
# Tests that mount need root and /dev/fuse. Without them they fail, saying what is
# missing: a test that did not run never counts as passed.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A need=(
  [mksquashfs]=squashfs-tools
  [unsquashfs]=squashfs-tools
  [fusermount3]=fuse3
  [setfattr]=attr
  [getfattr]=attr
  [squashfuse_ll]=squashfuse
  [busybox]=busybox-static
  [setpriv]=util-linux
  [unshare]=util-linux
  [mount]=mount
  [umount]=mount
  [losetup]=mount
  [find]=findutils
  [python3]=python3
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  if [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing $pkgs" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq $pkgs >/dev/null
  else
    echo "test.sh: missing packages: $pkgs (run as root, or: sudo apt-get install $pkgs)" >&2
    exit 1
  fi
fi

if [ "$(id -u)" != 0 ] || [ ! -c /dev/fuse ]; then
  echo "test.sh: WARNING: not root or no /dev/fuse: the mount and fixture tests will fail" >&2
fi

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
  # nextest does not run doctests.
  cargo test --doc --quiet
else
  cargo test --no-fail-fast "$@"
fi
