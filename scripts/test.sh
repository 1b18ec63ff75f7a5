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
  # Servers of the remote-image tests (tests/remote_util).
  [nginx]=nginx-light
  [docker-registry]=docker-registry
  [openssl]=openssl
  # The package test (tests/package.rs).
  [rpmbuild]=rpm
  [rpm]=rpm
  [objcopy]=binutils
  [readelf]=binutils
  [dpkg-deb]=dpkg
)
source scripts/need.sh
install_missing test.sh need

# The S3 server of the remote-image tests: moto from PyPI, in python3 if it can take it, else
# in a venv of ours (a Debian python3 refuses pip installs), which the tests then use.
moto_ok() { "$1" -c 'import moto.server, moto.core.authorization, boto3, flask' >/dev/null 2>&1; }
if ! moto_ok python3 && ! moto_ok target/moto-venv/bin/python3; then
  echo "test.sh: installing moto[server] (PyPI)" >&2
  if ! python3 -m pip install --quiet 'moto[server]>=5,<6' >/dev/null 2>&1 || ! moto_ok python3; then
    if ! python3 -m venv --help >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv target/moto-venv
    target/moto-venv/bin/python3 -m pip install --quiet 'moto[server]>=5,<6'
  fi
fi
if ! moto_ok python3 && moto_ok target/moto-venv/bin/python3; then
  SIFUSE_TEST_PYTHON="$PWD/target/moto-venv/bin/python3"
  export SIFUSE_TEST_PYTHON
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
