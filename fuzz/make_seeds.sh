#!/usr/bin/env bash
# Regenerates the seed corpora of the fuzz targets (fuzz/corpus/<target>/) with qemu-img and
# qemu-io: small images of every kind qcowrs reads (v2/v3, 512 B..64 KiB clusters, compressed
# zlib and zstd, extended L2, lazy refcounts (clean and dirty), an internal snapshot, a bitmap,
# refcount_bits 1 and 64, an overlay whose backing file is absent), and a few op programs for
# write_model. Sparse zero tails are cut off so that every seed stays small (< 300 KiB).
set -euo pipefail
cd "$(dirname "$0")"
command -v qemu-img >/dev/null || { echo "make_seeds.sh needs qemu-img and qemu-io (qemu-utils)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img() { echo "$work/$1.qcow2"; }
io() { local f=$1; shift; local args=(); for c in "$@"; do args+=(-c "$c"); done; qemu-io -f qcow2 "${args[@]}" "$f" >/dev/null; }
create() { local name=$1 size=$2 opts=$3; qemu-img create -q -f qcow2 -o "$opts" "$(img "$name")" "$size"; }

# v2 (compat=0.10), 512-byte clusters, data in several L2 tables, a zeroed range.
create v2-512 1M compat=0.10,cluster_size=512
io "$(img v2-512)" "write -P 0x11 0 3000" "write -P 0x22 70000 1000" "write -P 0x33 900000 512" "write -z 1024 1024"

# v3, 512-byte clusters: data, zero clusters, a discard, a write past the first L2 table.
create v3-512 2M cluster_size=512
io "$(img v3-512)" "write -P 0xaa 0 8192" "write -z 4096 2048" "discard 6144 1024" "write -P 0xbb 1048576 4096" \
   "write -P 0xcc 2096640 512"

# v3, 64 KiB clusters (the default): empty, and with 512 bytes of data (the zero tail of the
# data cluster is cut: 321 KiB, the one seed above 300 KiB; a 64 KiB-cluster image with data
# cannot be smaller, its first data cluster is the sixth).
create v3-64k-empty 4M cluster_size=65536
create v3-64k 4M cluster_size=65536
io "$(img v3-64k)" "write -P 0x5a 0 512"

# v3, 4 KiB clusters, refcount_bits=1 and refcount_bits=64.
create refcount1 1M cluster_size=4096,refcount_bits=1
io "$(img refcount1)" "write -P 0x01 0 10000" "write -P 0x02 500000 4096"
create refcount64 1M cluster_size=4096,refcount_bits=64
io "$(img refcount64)" "write -P 0x03 0 10000" "write -P 0x04 600000 4096"

# Compressed clusters, zlib and zstd (4 KiB clusters), next to plain data.
for ct in zlib zstd; do
  create "compressed-$ct" 1M "cluster_size=4096,compression_type=$ct"
  io "$(img "compressed-$ct")" "write -c -P 0x41 0 4096" "write -c -P 0x42 8192 8192" "write -P 0x43 65536 4096"
done
# qemu-img convert -c of a small raw file (8 KiB clusters zlib, 4 KiB clusters zstd).
python3 - "$work/raw.img" <<'PY'
import sys
with open(sys.argv[1], "wb") as f:
    f.truncate(512 << 10)
    for i in range(0, 512 << 10, 8192):
        f.seek(i)
        f.write(bytes([(i >> 13) & 0xff]) * 300 + b"qcowrs seed " * 20)
PY
qemu-img convert -q -c -O qcow2 -o cluster_size=8192 "$work/raw.img" "$(img convert-c-zlib)"
qemu-img convert -q -c -O qcow2 -o cluster_size=4096,compression_type=zstd "$work/raw.img" "$(img convert-c-zstd)"

# Extended L2 (subclusters), 16 KiB clusters: partial subcluster writes, a zeroed subcluster.
create extl2 1M cluster_size=16384,extended_l2=on
io "$(img extl2)" "write -P 0x61 2048 1024" "write -P 0x62 40960 512" "write -z 16384 2048" "discard 2048 512"

# Lazy refcounts: one closed cleanly, one left dirty by a crash (qemu-io's abort).
create lazy-clean 1M cluster_size=4096,lazy_refcounts=on
io "$(img lazy-clean)" "write -P 0x71 0 8192"
create lazy-dirty 1M cluster_size=4096,lazy_refcounts=on
io "$(img lazy-dirty)" "write -P 0x72 0 8192" "write -P 0x73 300000 4096" "flush" "abort" 2>/dev/null || true

# An internal snapshot, then writes over it (copy-on-write of shared clusters).
create snapshot 1M cluster_size=4096
io "$(img snapshot)" "write -P 0x81 0 12288"
qemu-img snapshot -c snap1 "$(img snapshot)"
io "$(img snapshot)" "write -P 0x82 4096 4096" "write -P 0x83 200000 4096"

# A persistent dirty bitmap.
create bitmap 1M cluster_size=4096
qemu-img bitmap -f qcow2 --add "$(img bitmap)" b0
io "$(img bitmap)" "write -P 0x91 0 4096"

# An overlay whose backing file is absent (the fuzz targets never open backing files).
create base 1M cluster_size=4096
io "$(img base)" "write -P 0xa1 0 65536"
qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 "$(img overlay)" 1M
io "$(img overlay)" "write -P 0xa2 4096 4096"
rm -f "$(img base)"

# Cut the zero tail of each image (to a 512-byte boundary).
for f in "$work"/*.qcow2; do
  python3 - "$f" <<'PY'
import sys
p = sys.argv[1]
b = open(p, "rb").read()
end = len(b.rstrip(b"\0"))
end = (end + 511) // 512 * 512
open(p, "wb").write(b[:end])
PY
done

for t in open_read check repair map; do
  mkdir -p "corpus/$t"
  rm -f "corpus/$t"/*.qcow2
  cp "$work"/*.qcow2 "corpus/$t/"
done

# header_parse sees cluster 0 only: the first 4 KiB of each image.
mkdir -p corpus/header_parse
rm -f corpus/header_parse/*.qcow2
for f in "$work"/*.qcow2; do head -c 4096 "$f" > "corpus/header_parse/$(basename "$f")"; done

# write_model: op programs (see fuzz_targets/write_model.rs for the encoding). The first four
# bytes choose the geometry; then 8-byte ops.
mkdir -p corpus/write_model
rm -f corpus/write_model/*.bin
python3 - corpus/write_model <<'PY'
import os, struct, sys
out = sys.argv[1]
def op(kind, off, length, val=0x5a):
    return struct.pack(">BBHI", kind, val, length, off)
progs = {
    "writes-512": bytes([0, 4, 0, 0]) + op(0, 0, 700) + op(0, 1000, 3000) + op(3, 0, 0) + op(0, 500, 100),
    "zeroes-4k": bytes([3, 4, 0, 0]) + op(0, 0, 9000) + op(1, 2048, 5000) + op(4, 0, 0) + op(0, 3000, 10),
    "discard-64k": bytes([7, 4, 0, 0]) + op(0, 60000, 20000) + op(2, 65536, 65535) + op(3, 0, 0) + op(2, 0, 100),
    "extl2-16k": bytes([5, 4, 1, 0]) + op(0, 1000, 3000) + op(1, 0, 2048) + op(2, 16384, 8192) + op(4, 0, 0),
    "truncate-grow": bytes([2, 0, 0, 1]) + op(0, 0, 4096) + op(5, 1 << 20, 0) + op(0, 0x100000, 4096) + op(4, 0, 0),
    "refcount64": bytes([1, 6, 0, 0]) + op(0, 0, 2000) + op(0, 0, 2000) + op(2, 0, 4096) + op(3, 0, 0),
}
for name, data in progs.items():
    with open(os.path.join(out, name + ".bin"), "wb") as f:
        f.write(data)
PY

du -sh corpus
ls -l corpus/open_read
