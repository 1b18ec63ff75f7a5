#!/usr/bin/env bash
# Builds sifuse's .deb and .rpm from one staged tree:
#
#   scripts/package.sh                    # cargo build --release, then both packages in target/package/
#   scripts/package.sh --out DIR          # packages into DIR
#   scripts/package.sh --binary PATH      # package an already built sifuse (the test suite's)
#   scripts/package.sh --no-rpm           # the .deb only
#
# Both install /usr/bin/sifuse, its man page, bash/zsh/fish completions, the compat links
# /usr/libexec/sifuse/squashfuse_ll and squashfuse (not on PATH: nothing is replaced by
# surprise), README.md and the two license texts. Prints the path of each package it wrote.
#
# Tools: dpkg-deb (every Debian system has it) and rpmbuild (Debian's `rpm` package, a
# binary install of a few MB, installed here when missing) pack a tree staged by this
# script. cargo-deb and cargo-generate-rpm would each be compiled from source first, minutes
# on two cores, for what a few `install` lines do.
#
# A binary that carries debug information is stripped, and its debug information kept aside
# as sifuse-VERSION-ARCH.debug next to the packages (gdb finds it by the debuglink).
set -euo pipefail

binary=
out=
rpm=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --no-rpm) rpm=no; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "package.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
# Paths given are relative to where the script was called from; then work from the repo.
[ -n "$binary" ] && binary=$(realpath -- "$binary")
[ -n "$out" ] && out=$(realpath -m -- "$out")
cd "$(dirname "$0")/.."
out=${out:-$PWD/target/package}

# command -> Debian package
declare -A need=([dpkg-deb]=dpkg [objcopy]=binutils [gzip]=gzip)
[ "$rpm" = yes ] && need[rpmbuild]=rpm
source scripts/need.sh
install_missing package.sh need

if [ -z "$binary" ]; then
  cargo build --release --locked --bin sifuse >&2
  binary=$PWD/target/release/sifuse
fi
[ -x "$binary" ] || { echo "package.sh: $binary is not an executable" >&2; exit 1; }

# The version as the binary says it (`sifuse -V` prints "sifuse VERSION").
version=$("$binary" -V | awk '$1 == "sifuse" { print $2 }')
[ -n "$version" ] || { echo "package.sh: $binary -V did not print a version" >&2; exit 1; }
deb_arch=$(dpkg --print-architecture)
rpm_arch=$(uname -m)

umask 022
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The binary, stripped; debug information, if any, kept aside.
mkdir -p "$work/bin"
sections=$(readelf -S "$binary")
if grep -q '\.debug_info' <<<"$sections"; then
  debug="$out/sifuse-$version-$deb_arch.debug"
  objcopy --only-keep-debug "$binary" "$debug"
  chmod 0644 "$debug"
  objcopy --strip-all --add-gnu-debuglink="$debug" "$binary" "$work/bin/sifuse"
else
  objcopy --strip-all "$binary" "$work/bin/sifuse"
fi
chmod 0755 "$work/bin/sifuse"

# stage ROOT ZSH_DIR DOC_DIR LICENSE_DIR: the installed tree under ROOT. The two
# distribution families differ only in where zsh looks for vendor completions and where
# license texts go.
stage() {
  local root=$1 zsh_dir=$2 doc_dir=$3 license_dir=$4
  install -D -m 0755 "$work/bin/sifuse" "$root/usr/bin/sifuse"
  install -d "$root/usr/libexec/sifuse"
  ln -s ../../bin/sifuse "$root/usr/libexec/sifuse/squashfuse_ll"
  ln -s ../../bin/sifuse "$root/usr/libexec/sifuse/squashfuse"
  install -d "$root/usr/share/man/man1"
  gzip -9n < man/sifuse.1 > "$root/usr/share/man/man1/sifuse.1.gz"
  install -d "$root/usr/share/bash-completion/completions" "$root$zsh_dir" \
    "$root/usr/share/fish/vendor_completions.d"
  "$work/bin/sifuse" completions bash > "$root/usr/share/bash-completion/completions/sifuse"
  "$work/bin/sifuse" completions zsh > "$root$zsh_dir/_sifuse"
  "$work/bin/sifuse" completions fish > "$root/usr/share/fish/vendor_completions.d/sifuse.fish"
  install -D -m 0644 README.md "$root$doc_dir/README.md"
  install -D -m 0644 LICENSE-MIT "$root$license_dir/LICENSE-MIT"
  install -D -m 0644 LICENSE-APACHE "$root$license_dir/LICENSE-APACHE"
}

summary=$(sed -n 's/^description = "\(.*\)"$/\1/p' Cargo.toml)
longdesc="A native replacement for squashfuse: serves SquashFS images, bare or inside SIF
containers, read-only over FUSE as the kernel's squashfs driver shows them. Links named
squashfuse_ll and squashfuse in /usr/libexec/sifuse take squashfuse's command line, for
SingularityCE and Apptainer to use in its place."

# .deb
deb_root=$work/deb
stage "$deb_root" /usr/share/zsh/vendor-completions /usr/share/doc/sifuse /usr/share/doc/sifuse
cat > "$deb_root/usr/share/doc/sifuse/copyright" <<EOF
sifuse is licensed under the MIT license or the Apache License, Version 2.0, at your
option: LICENSE-MIT and LICENSE-APACHE in this directory.
EOF
# Depends, from the libraries the binary links (what dpkg-shlibdeps would say, without a
# debian/ directory): the newest symbol version it uses from each is the least it needs.
newest() { objdump -T "$work/bin/sifuse" | grep -o "$1[0-9.]*" | sed "s/^$1//" | sort -V | tail -n 1; }
depends="libc6 (>= $(newest GLIBC_))"
for lib in $(objdump -p "$work/bin/sifuse" | awk '$1 == "NEEDED" { print $2 }'); do
  case "$lib" in
    libc.so.6|libm.so.6|libpthread.so.0|libdl.so.2|librt.so.1|ld-linux-*.so.*) ;;
    libgcc_s.so.1) depends="$depends, libgcc-s1 (>= $(newest GCC_))" ;;
    *) echo "package.sh: the binary links $lib: add its Debian package to package.sh" >&2; exit 1 ;;
  esac
done
mkdir -p "$deb_root/DEBIAN"
(cd "$deb_root" && find usr -type f | sort | xargs md5sum) > "$deb_root/DEBIAN/md5sums"
cat > "$deb_root/DEBIAN/control" <<EOF
Package: sifuse
Version: $version
Architecture: $deb_arch
Maintainer: The sifuse developers
Installed-Size: $(du -sk --exclude=DEBIAN "$deb_root" | cut -f1)
Depends: $depends, fuse3
Section: admin
Priority: optional
Description: $summary
$(printf '%s\n' "$longdesc" | sed 's/^/ /')
EOF
deb="$out/sifuse_${version}_${deb_arch}.deb"
dpkg-deb --root-owner-group --build "$deb_root" "$deb" >/dev/null
echo "$deb"

# .rpm: rpmbuild copies the staged tree; the file list is written out, not globbed.
if [ "$rpm" = yes ]; then
  rpm_root=$work/rpm-root
  stage "$rpm_root" /usr/share/zsh/site-functions /usr/share/doc/sifuse /usr/share/licenses/sifuse
  mkdir -p "$work/rpmbuild"
  cat > "$work/sifuse.spec" <<EOF
Name: sifuse
Version: $version
Release: 1
Summary: $summary
License: MIT OR Apache-2.0
Requires: fuse3
# The tree is staged and stripped already: no debuginfo package, no build-id links, none of
# the distribution's post-install rewriting.
%global debug_package %{nil}
%global _build_id_links none
%global __os_install_post %{nil}

%description
$longdesc

%install
cp -a "$rpm_root/." "%{buildroot}/"

%files
/usr/bin/sifuse
%dir /usr/libexec/sifuse
%dir /usr/share/doc/sifuse
%dir /usr/share/licenses/sifuse
/usr/libexec/sifuse/squashfuse_ll
/usr/libexec/sifuse/squashfuse
/usr/share/man/man1/sifuse.1.gz
/usr/share/bash-completion/completions/sifuse
/usr/share/zsh/site-functions/_sifuse
/usr/share/fish/vendor_completions.d/sifuse.fish
%doc /usr/share/doc/sifuse/README.md
%license /usr/share/licenses/sifuse/LICENSE-MIT
%license /usr/share/licenses/sifuse/LICENSE-APACHE
EOF
  if ! rpmbuild --quiet -bb --target "$rpm_arch" --define "_topdir $work/rpmbuild" \
    "$work/sifuse.spec" > "$work/rpmbuild.log" 2>&1; then
    cat "$work/rpmbuild.log" >&2
    exit 1
  fi
  rpm_file="$out/sifuse-$version-1.$rpm_arch.rpm"
  mv "$work/rpmbuild/RPMS/$rpm_arch/sifuse-$version-1.$rpm_arch.rpm" "$rpm_file"
  echo "$rpm_file"
fi
