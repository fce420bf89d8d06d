//! On-disk constants and pure bit helpers of the qcow2 format (QEMU `docs/interop/qcow2.txt`).
//! No I/O here.

/// `QFI\xfb`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;

/// Smallest cluster: 512 bytes (spec: cluster_bits >= 9).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster QEMU supports: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need at least 16 KiB clusters (32 subclusters of >= 512 bytes).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// refcount_order may not exceed 6 (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// QEMU's `QCOW_MAX_L1_SIZE`: 32 MiB of L1 entries.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE`: 8 MiB of reftable.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name (spec: must not exceed 1023 bytes).
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// QEMU's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// The compression_type header field is meaningful.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// L2 entries are 128 bits with a subcluster bitmap.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Every incompatible bit qcowrs understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2;

/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is raw (guest offset == host offset).
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
/// Bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_BE77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Compression types.
pub const COMPRESSION_ZLIB: u8 = 0;
/// zstd compression.
pub const COMPRESSION_ZSTD: u8 = 1;

/// L1 entry: OFLAG_COPIED.
pub const L1E_COPIED: u64 = 1 << 63;
/// L1 entry: L2 table offset bits 9-55.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry: reserved bits (QEMU `L1E_RESERVED_MASK`).
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;

/// L2 entry: OFLAG_COPIED.
pub const L2E_COPIED: u64 = 1 << 63;
/// L2 entry: OFLAG_COMPRESSED.
pub const L2E_COMPRESSED: u64 = 1 << 62;
/// L2 entry (standard cluster): reads as zeros.
pub const L2E_ZERO: u64 = 1;
/// L2 entry (standard cluster): host offset bits 9-55.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry (standard cluster): reserved bits (QEMU `L2E_STD_RESERVED_MASK`).
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;

/// Reftable entry: refblock offset bits 9-63.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reftable entry: reserved bits 0-8.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Size of one compressed-data sector.
pub const COMPRESSED_SECTOR: u64 = 512;

/// Layout of a compressed cluster descriptor, which depends on cluster_bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedLayout {
    /// `x = 62 - (cluster_bits - 8)`: bits 0..x-1 hold the host byte offset.
    pub csize_shift: u32,
    /// Mask of the additional-sector count after shifting.
    pub csize_mask: u64,
    /// Mask of the host byte offset.
    pub offset_mask: u64,
}

impl CompressedLayout {
    /// The layout for a given cluster_bits (9..=21).
    pub fn new(cluster_bits: u32) -> Self {
        let csize_shift = 62 - (cluster_bits - 8);
        CompressedLayout {
            csize_shift,
            csize_mask: (1u64 << (cluster_bits - 8)) - 1,
            offset_mask: (1u64 << csize_shift) - 1,
        }
    }

    /// Host byte range `(offset, length)` of a compressed descriptor (bits 0..61 of the entry).
    pub fn decode(&self, entry: u64) -> (u64, u64) {
        let coffset = entry & self.offset_mask;
        let nsect = ((entry >> self.csize_shift) & self.csize_mask) + 1;
        let csize = nsect * COMPRESSED_SECTOR - (coffset & (COMPRESSED_SECTOR - 1));
        (coffset, csize)
    }

    /// Encodes a compressed descriptor (without the flag) for `len` bytes at `offset`.
    pub fn encode(&self, offset: u64, len: u64) -> u64 {
        let end = offset + len;
        let nsect = end.div_ceil(COMPRESSED_SECTOR) - offset / COMPRESSED_SECTOR;
        (offset & self.offset_mask) | (((nsect - 1) & self.csize_mask) << self.csize_shift)
    }
}

/// Refcount table/block geometry derived from cluster_bits and refcount_order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountGeometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
}

impl RefcountGeometry {
    /// Width of one refcount in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Largest representable refcount.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }
    /// log2 of the number of refcount entries in one refblock.
    pub fn refblock_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }
    /// Refcount entries per refblock.
    pub fn refblock_entries(&self) -> u64 {
        1u64 << self.refblock_bits()
    }
    /// Bytes of host file one refblock covers.
    pub fn bytes_per_refblock(&self) -> u64 {
        1u64 << (self.refblock_bits() + self.cluster_bits)
    }
}

/// The refcount of entry `i` in a refblock buffer of width `1 << order` bits. Sub-byte widths
/// are packed LSB first inside each byte; wider ones are big endian. `i` must be in the buffer.
pub fn refcount_at(buf: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            u64::from((buf[i / per] >> ((i % per) * bits)) & ((1u8 << bits) - 1))
        }
        3 => u64::from(buf[i]),
        4 => u64::from(u16::from_be_bytes([buf[2 * i], buf[2 * i + 1]])),
        5 => u64::from(be_u32_at(buf, 4 * i)),
        _ => be_u64_at(buf, 8 * i),
    }
}

/// Sets entry `i` of a refblock buffer to `v` (masked to the width; callers check against
/// `refcount_max`). `i` must be in the buffer.
pub fn set_refcount_at(buf: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let shift = (i % per) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            // Masked to `bits` (< 8) bits, so the cast cannot lose anything that is kept.
            #[allow(clippy::cast_possible_truncation)]
            let val = ((v as u8) << shift) & mask;
            buf[i / per] = (buf[i / per] & !mask) | val;
        }
        o => {
            let w = 1usize << (o - 3);
            buf[w * i..w * i + w].copy_from_slice(&v.to_be_bytes()[8 - w..]);
        }
    }
}

/// Decodes every refcount of a refblock buffer.
pub fn decode_refcounts(buf: &[u8], order: u32) -> Vec<u64> {
    let entries = (buf.len() * 8) >> order;
    (0..entries).map(|i| refcount_at(buf, order, i)).collect()
}

/// Encodes refcounts into a refblock buffer of `buf.len()` bytes (the rest zero-filled).
pub fn encode_refcounts(refcounts: &[u64], order: u32, buf: &mut [u8]) {
    buf.fill(0);
    let entries = (buf.len() * 8) >> order;
    for (i, &r) in refcounts.iter().enumerate().take(entries) {
        set_refcount_at(buf, order, i, r);
    }
}

/// Reads a big-endian u64 from an 8-byte slice (callers pass `chunks_exact(8)` items).
pub fn be_u64(c: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&c[..8]);
    u64::from_be_bytes(a)
}

/// Reads a big-endian u32 at `off` of `buf` (callers check bounds).
pub fn be_u32_at(buf: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&buf[off..off + 4]);
    u32::from_be_bytes(a)
}

/// Reads a big-endian u64 at `off` of `buf` (callers check bounds).
pub fn be_u64_at(buf: &[u8], off: usize) -> u64 {
    be_u64(&buf[off..off + 8])
}

/// Reads a big-endian u16 at `off` of `buf` (callers check bounds).
pub fn be_u16_at(buf: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([buf[off], buf[off + 1]])
}

/// Rounds `x` up to a multiple of the power of two `align`, or `None` on overflow.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_roundtrip_every_width() {
        for order in 0..=6u32 {
            let geo = RefcountGeometry { cluster_bits: 9, refcount_order: order };
            let n = geo.refblock_entries() as usize;
            let max = geo.refcount_max();
            let vals: Vec<u64> = (0..n as u64).map(|i| (i * 7 + 3) & max).collect();
            let mut buf = vec![0u8; 512];
            encode_refcounts(&vals, order, &mut buf);
            assert_eq!(decode_refcounts(&buf, order), vals, "order {order}");
        }
    }

    #[test]
    fn sub_byte_packing_is_lsb_first() {
        // refcount_bits = 2: entry 0 in bits 0-1, entry 1 in bits 2-3.
        let mut buf = [0u8; 1];
        encode_refcounts(&[1, 2, 0, 3], 1, &mut buf);
        assert_eq!(buf[0], 0b1100_1001);
    }

    #[test]
    fn compressed_layout_64k() {
        let l = CompressedLayout::new(16);
        assert_eq!(l.csize_shift, 54);
        // From qcow2-notes: two compressed writes share cluster 5.
        let (off, len) = l.decode(0x0000_0000_0005_004f);
        assert_eq!(off, 0x5004f);
        assert_eq!(len, 512 - 0x4f);
        let e = l.encode(0x50000, 1000);
        assert_eq!(l.decode(e), (0x50000, 1024));
    }
}
