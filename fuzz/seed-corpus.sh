#!/usr/bin/env bash
# Seed the fuzz corpora from the committed fixtures (nothing big is committed under fuzz/):
#   fuzz/seed-corpus.sh            # all targets
#   fuzz/seed-corpus.sh archive    # one target
# Copies fixtures/tiny/*.sqfs and fixtures/demo.sif, wraps the smallest image in a SIF
# (cargo run --example mksif), adds the regression inputs, and for inode_dir writes
# "<seed selector byte><that seed's inode and directory tables>" for each tiny image.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(sif superblock_tables inode_dir archive dir_paging xattr_lookup)

tiny=(fixtures/tiny/tiny-raw.sqfs fixtures/tiny/tiny-gzip.sqfs fixtures/tiny/tiny-zstd-nofrag.sqfs)
small_sif=fuzz/target/seed-tiny.sif
mkdir -p fuzz/target
if [ ! -f "$small_sif" ]; then
    cargo run --quiet --example mksif -- fixtures/tiny/tiny-zstd-nofrag.sqfs "$small_sif" amd64
fi

for t in "${targets[@]}"; do
    c=fuzz/corpus/$t
    mkdir -p "$c"
    case $t in
        sif)
            cp "$small_sif" "$c/tiny.sif"
            # The header and descriptor table of the demo SIF, without the 1 MB payload.
            head -c 65536 fixtures/demo.sif >"$c/demo-head.sif"
            ;;
        superblock_tables)
            cp "${tiny[@]}" "$c/"
            ;;
        archive | dir_paging | xattr_lookup)
            cp "${tiny[@]}" fixtures/demo.sif "$small_sif" "$c/"
            ;;
        inode_dir)
            i=0
            for img in "${tiny[@]}"; do
                python3 - "$img" "$c/$(basename "$img" .sqfs).tables" "$i" <<'PY'
import struct, sys
img = open(sys.argv[1], 'rb').read()
u64 = lambda at: struct.unpack_from('<Q', img, at)[0]
inode_t, dir_t, end = u64(64), u64(72), u64(40)
# Same rule as sifuse_fuzz::inode_dir_region.
for field in (48, 56, 80, 88):
    at = u64(field)
    if at == 2**64 - 1:
        continue
    if at + 8 <= len(img):
        first = u64(at)
        if dir_t < first < end:
            end = first
    if dir_t < at < end:
        end = at
open(sys.argv[2], 'wb').write(bytes([int(sys.argv[3])]) + img[inode_t:end])
PY
                i=$((i + 1))
            done
            ;;
        *)
            echo "seed-corpus.sh: unknown target $t" >&2
            exit 2
            ;;
    esac
    if [ -d "fuzz/regressions/$t" ]; then
        find "fuzz/regressions/$t" -type f ! -name '*.md' -exec cp {} "$c/" \;
    fi
    echo "seeded $c ($(ls "$c" | wc -l) files)"
done
