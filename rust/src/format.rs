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

/// QEMU's cluster types (`qcow2_get_cluster_type`), for a whole L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterType {
    /// No host cluster: reads from the backing file (or as zeros).
    Unallocated,
    /// Reads as zeros, no host cluster (standard entries only).
    ZeroPlain,
    /// Reads as zeros, with a preallocated (refcounted) host cluster (standard entries only).
    ZeroAlloc,
    /// A host cluster holds the data (with extended L2: the subclusters marked allocated).
    Normal,
    /// The cluster is compressed into a byte range of the image file.
    Compressed,
}

/// What one subcluster (or a whole standard cluster) reads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubclusterState {
    /// Not allocated in this image: the backing file shows through.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Stored at the entry's host cluster.
    Data,
}

/// Something wrong with one L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Defect {
    /// Reserved bits of a standard entry are set.
    ReservedBits,
    /// The host offset is not cluster aligned.
    Misaligned(u64),
    /// A compressed entry has OFLAG_COPIED set.
    CompressedCopied,
    /// A compressed entry in an image whose data lives in an external data file.
    CompressedWithDataFile,
    /// A compressed entry with a non-zero subcluster bitmap.
    CompressedWithBitmap,
    /// Subclusters marked both allocated and zero.
    AllocatedAndZero,
    /// An unallocated cluster with subclusters marked allocated.
    UnallocatedWithAllocBits,
}

impl std::fmt::Display for L2Defect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            L2Defect::ReservedBits => write!(f, "reserved bits are set"),
            L2Defect::Misaligned(o) => write!(f, "data cluster offset 0x{o:x} is not cluster aligned"),
            L2Defect::CompressedCopied => write!(f, "the copied flag must never be set for compressed clusters"),
            L2Defect::CompressedWithDataFile => write!(f, "compressed cluster in an image with an external data file"),
            L2Defect::CompressedWithBitmap => write!(f, "compressed cluster with a non-zero subcluster bitmap"),
            L2Defect::AllocatedAndZero => write!(f, "subcluster bitmap marks subclusters both allocated and zero"),
            L2Defect::UnallocatedWithAllocBits => write!(f, "unallocated cluster with allocated subclusters"),
        }
    }
}

/// One L2 entry as stored: the descriptor word and, with extended L2, the subcluster bitmap
/// (bits 0-31 allocated, 32-63 reads-as-zero; 0 for standard entries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Entry {
    /// The 64-bit descriptor.
    pub entry: u64,
    /// The subcluster bitmap.
    pub bitmap: u64,
}

impl L2Entry {
    /// Whether the entry is all zeros (unallocated, nothing set).
    pub fn is_empty(&self) -> bool {
        self.entry == 0 && self.bitmap == 0
    }
    /// OFLAG_COPIED: the host cluster's refcount is exactly 1.
    pub fn is_copied(&self) -> bool {
        self.entry & L2E_COPIED != 0
    }
    /// The host cluster offset of a standard entry (bits 9-55).
    pub fn host_offset(&self) -> u64 {
        self.entry & L2E_OFFSET_MASK
    }
    /// Subclusters marked allocated (bit i: subcluster i).
    pub fn alloc_bits(&self) -> u32 {
        // The low half of the bitmap.
        #[allow(clippy::cast_possible_truncation)]
        let v = self.bitmap as u32;
        v
    }
    /// Subclusters marked reads-as-zero.
    pub fn zero_bits(&self) -> u32 {
        #[allow(clippy::cast_possible_truncation)]
        let v = (self.bitmap >> 32) as u32;
        v
    }
}

/// Every subcluster allocated (extended L2 bitmap).
pub const SUBCLUSTER_ALL_ALLOC: u64 = 0xffff_ffff;
/// Every subcluster reads as zero (extended L2 bitmap).
pub const SUBCLUSTER_ALL_ZERO: u64 = 0xffff_ffff << 32;

/// Makes an L1 entry pointing at the L2 table at `l2_offset`.
pub fn l1_entry_make(l2_offset: u64, copied: bool) -> u64 {
    (l2_offset & L1E_OFFSET_MASK) | if copied { L1E_COPIED } else { 0 }
}
/// The L2 table offset of an L1 entry (0: no table).
pub fn l1_entry_l2_offset(e: u64) -> u64 {
    e & L1E_OFFSET_MASK
}
/// Whether an L1 entry has OFLAG_COPIED.
pub fn l1_entry_is_copied(e: u64) -> bool {
    e & L1E_COPIED != 0
}
/// Whether an L1 entry has reserved bits set.
pub fn l1_entry_has_reserved_bits(e: u64) -> bool {
    e & L1E_RESERVED_MASK != 0
}

/// Everything needed to interpret L2 entries: the one place their bits are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 128-bit entries with subcluster bitmaps.
    pub extended: bool,
    /// The image has an external data file.
    pub data_file: bool,
    /// Compressed descriptor layout.
    pub compressed: CompressedLayout,
}

impl L2Geometry {
    /// The geometry for an image.
    pub fn new(cluster_bits: u32, extended: bool, data_file: bool) -> Self {
        L2Geometry { cluster_bits, extended, data_file, compressed: CompressedLayout::new(cluster_bits) }
    }
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// u64 words per entry (1, or 2 with extended L2).
    pub fn words_per_entry(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }
    /// Entries per L2 table.
    pub fn entries_per_table(&self) -> u64 {
        self.cluster_size() / (8 * self.words_per_entry() as u64)
    }
    /// Guest bytes one L2 table maps.
    pub fn bytes_per_table(&self) -> u64 {
        self.entries_per_table() << self.cluster_bits
    }
    /// log2 of the subcluster size (extended L2).
    pub fn subcluster_bits(&self) -> u32 {
        self.cluster_bits - SUBCLUSTERS.trailing_zeros()
    }
    /// Entry `index` of a decoded L2 table (words); empty past the end of a short table.
    pub fn entry_at(&self, table: &[u64], index: usize) -> L2Entry {
        let w = self.words_per_entry();
        let entry = table.get(index * w).copied().unwrap_or(0);
        let bitmap = if self.extended { table.get(index * w + 1).copied().unwrap_or(0) } else { 0 };
        L2Entry { entry, bitmap }
    }
    /// Stores entry `index` into a decoded L2 table (a table of the right size).
    pub fn set_entry(&self, table: &mut [u64], index: usize, e: L2Entry) {
        let w = self.words_per_entry();
        if let Some(slot) = table.get_mut(index * w) {
            *slot = e.entry;
        }
        if self.extended {
            if let Some(slot) = table.get_mut(index * w + 1) {
                *slot = e.bitmap;
            }
        }
    }

    /// QEMU's `qcow2_get_cluster_type`.
    pub fn cluster_type(&self, e: L2Entry) -> ClusterType {
        if e.entry & L2E_COMPRESSED != 0 {
            ClusterType::Compressed
        } else if e.entry & L2E_ZERO != 0 && !self.extended {
            if e.host_offset() != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if e.host_offset() == 0 {
            // Offset 0 is a valid data-file offset; there every cluster has refcount 1, so
            // OFLAG_COPIED disambiguates (as QEMU).
            if self.data_file && e.is_copied() {
                ClusterType::Normal
            } else {
                ClusterType::Unallocated
            }
        } else {
            ClusterType::Normal
        }
    }

    /// The host byte range `(offset, length)` of a compressed entry.
    pub fn compressed_range(&self, e: L2Entry) -> (u64, u64) {
        self.compressed.decode(e.entry & !(L2E_COPIED | L2E_COMPRESSED))
    }

    /// Makes a compressed entry for `len` bytes at host byte `offset`.
    pub fn make_compressed(&self, offset: u64, len: u64) -> L2Entry {
        L2Entry { entry: L2E_COMPRESSED | self.compressed.encode(offset, len), bitmap: 0 }
    }

    /// Makes an entry whose whole cluster is data at `host` (refcount 1: COPIED set).
    pub fn make_data(&self, host: u64) -> L2Entry {
        L2Entry {
            entry: (host & L2E_OFFSET_MASK) | L2E_COPIED,
            bitmap: if self.extended { SUBCLUSTER_ALL_ALLOC } else { 0 },
        }
    }

    /// Makes an entry whose whole cluster reads as zeros without a host cluster (`version` 2
    /// has no zero flag: the entry becomes unallocated).
    pub fn make_zero(&self, version: u32) -> L2Entry {
        if version < 3 {
            L2Entry::default()
        } else if self.extended {
            L2Entry { entry: 0, bitmap: SUBCLUSTER_ALL_ZERO }
        } else {
            L2Entry { entry: L2E_ZERO, bitmap: 0 }
        }
    }

    /// The host clusters an entry holds a reference to, as `(first, last)` cluster indexes
    /// (none for unallocated and plain zero entries, and for data-file data).
    pub fn referenced_clusters(&self, e: L2Entry) -> Option<(u64, u64)> {
        match self.cluster_type(e) {
            ClusterType::Normal | ClusterType::ZeroAlloc if !self.data_file => {
                let c = e.host_offset() >> self.cluster_bits;
                Some((c, c))
            }
            ClusterType::Compressed => {
                let (off, len) = self.compressed_range(e);
                let end = off.checked_add(len)?;
                Some((off >> self.cluster_bits, (end - 1) >> self.cluster_bits))
            }
            _ => None,
        }
    }

    /// Every defect of an entry, in QEMU's checking order (calls `f` for each).
    pub fn for_each_defect(&self, e: L2Entry, mut f: impl FnMut(L2Defect)) {
        let ty = self.cluster_type(e);
        if ty != ClusterType::Compressed && e.entry & L2E_STD_RESERVED_MASK != 0 {
            f(L2Defect::ReservedBits);
        }
        match ty {
            ClusterType::Compressed => {
                if e.is_copied() {
                    f(L2Defect::CompressedCopied);
                }
                if self.data_file {
                    f(L2Defect::CompressedWithDataFile);
                } else if self.extended && e.bitmap != 0 {
                    f(L2Defect::CompressedWithBitmap);
                }
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                if self.extended && (e.bitmap >> 32) & e.bitmap != 0 {
                    f(L2Defect::AllocatedAndZero);
                }
                if e.host_offset() & (self.cluster_size() - 1) != 0 {
                    f(L2Defect::Misaligned(e.host_offset()));
                }
            }
            ClusterType::Unallocated => {
                if self.extended && e.alloc_bits() != 0 {
                    f(L2Defect::UnallocatedWithAllocBits);
                }
            }
            ClusterType::ZeroPlain => {}
        }
    }

    /// Whether `e` is a standard data entry without any defect (the common case, which a check
    /// can count without looking further).
    pub fn is_clean_data(&self, e: L2Entry) -> bool {
        !self.extended
            && e.entry & (L2E_COMPRESSED | L2E_ZERO | L2E_STD_RESERVED_MASK) == 0
            && e.host_offset() != 0
            && e.host_offset() & (self.cluster_size() - 1) == 0
    }

    /// What subcluster `sc` of a non-compressed entry reads as (QEMU's
    /// `qcow2_get_subcluster_type`; a standard entry is one subcluster).
    pub fn subcluster_state(&self, e: L2Entry, sc: u32) -> SubclusterState {
        let ty = self.cluster_type(e);
        if !self.extended {
            return match ty {
                ClusterType::ZeroPlain | ClusterType::ZeroAlloc => SubclusterState::Zero,
                ClusterType::Normal => SubclusterState::Data,
                _ => SubclusterState::Unallocated,
            };
        }
        if e.zero_bits() >> sc & 1 == 1 {
            SubclusterState::Zero
        } else if ty == ClusterType::Normal && e.alloc_bits() >> sc & 1 == 1 {
            SubclusterState::Data
        } else {
            SubclusterState::Unallocated
        }
    }

    /// How the byte at `in_cluster` reads, and the offset within the cluster where that state
    /// ends (the end of a run of subclusters in the same state). Compressed entries are
    /// `Data` over the whole cluster (read them with [`L2Geometry::compressed_range`]).
    /// Fails on entries the read path must not trust (misaligned offsets, invalid bitmaps).
    pub fn read_state(&self, e: L2Entry, in_cluster: u64) -> Result<(SubclusterState, u64), L2Defect> {
        let cs = self.cluster_size();
        let ty = self.cluster_type(e);
        if ty == ClusterType::Compressed {
            if self.extended && e.bitmap != 0 {
                return Err(L2Defect::CompressedWithBitmap);
            }
            return Ok((SubclusterState::Data, cs));
        }
        if matches!(ty, ClusterType::Normal | ClusterType::ZeroAlloc) && e.host_offset() & (cs - 1) != 0 {
            return Err(L2Defect::Misaligned(e.host_offset()));
        }
        if !self.extended {
            return Ok((self.subcluster_state(e, 0), cs));
        }
        if e.alloc_bits() & e.zero_bits() != 0 {
            return Err(L2Defect::AllocatedAndZero);
        }
        if ty == ClusterType::Unallocated && e.alloc_bits() != 0 {
            return Err(L2Defect::UnallocatedWithAllocBits);
        }
        let sc_bits = self.subcluster_bits();
        // in_cluster < cluster size, so the subcluster index is below 32.
        #[allow(clippy::cast_possible_truncation)]
        let sc = (in_cluster >> sc_bits) as u32;
        let s0 = self.subcluster_state(e, sc);
        let mut last = sc;
        while last + 1 < SUBCLUSTERS && self.subcluster_state(e, last + 1) == s0 {
            last += 1;
        }
        Ok((s0, u64::from(last + 1) << sc_bits))
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

    fn geo(extended: bool) -> L2Geometry {
        L2Geometry::new(16, extended, false)
    }

    #[test]
    fn classifies_standard_entries_as_qemu() {
        let g = geo(false);
        let e = |entry| L2Entry { entry, bitmap: 0 };
        assert_eq!(g.cluster_type(e(0)), ClusterType::Unallocated);
        assert_eq!(g.cluster_type(e(L2E_COPIED | 0x50000)), ClusterType::Normal);
        assert_eq!(g.cluster_type(e(1)), ClusterType::ZeroPlain);
        assert_eq!(g.cluster_type(e(0x50001)), ClusterType::ZeroAlloc);
        // Offset 0 with COPIED and no data file is unallocated (QEMU's classification) ...
        assert_eq!(g.cluster_type(e(L2E_COPIED)), ClusterType::Unallocated);
        // ... and data at host offset 0 with one.
        assert_eq!(L2Geometry::new(16, false, true).cluster_type(e(L2E_COPIED)), ClusterType::Normal);
        assert_eq!(g.cluster_type(e(L2E_COMPRESSED | 5)), ClusterType::Compressed);
        assert_eq!(g.read_state(e(L2E_COPIED | 0x50000), 100), Ok((SubclusterState::Data, 65536)));
        assert_eq!(g.read_state(e(0x50200), 0), Err(L2Defect::Misaligned(0x50200)));
        let mut d = Vec::new();
        g.for_each_defect(e(0x50200 | 0x2), |x| d.push(x));
        assert_eq!(d, vec![L2Defect::ReservedBits, L2Defect::Misaligned(0x50200)]);
        assert_eq!(g.referenced_clusters(e(0x50000)), Some((5, 5)));
        assert_eq!(g.referenced_clusters(g.make_compressed(0x5ff00, 0x200)), Some((5, 6)));
        assert_eq!(g.referenced_clusters(e(1)), None);
    }

    #[test]
    fn subcluster_states_and_runs() {
        let g = geo(true);
        // Subclusters 0-1 allocated, 2 zero, the rest unallocated; subclusters of 2 KiB.
        let e = L2Entry { entry: 0x50000, bitmap: 0b11 | (0b100u64 << 32) };
        assert_eq!(g.read_state(e, 0), Ok((SubclusterState::Data, 4096)));
        assert_eq!(g.read_state(e, 4096), Ok((SubclusterState::Zero, 6144)));
        assert_eq!(g.read_state(e, 6144), Ok((SubclusterState::Unallocated, 65536)));
        let bad = L2Entry { entry: 0x50000, bitmap: 1 | (1 << 32) };
        assert_eq!(g.read_state(bad, 0), Err(L2Defect::AllocatedAndZero));
        let bad = L2Entry { entry: 0, bitmap: 1 };
        assert_eq!(g.read_state(bad, 0), Err(L2Defect::UnallocatedWithAllocBits));
        // An unallocated cluster with zero bits: zero where marked, backing elsewhere.
        let z = L2Entry { entry: 0, bitmap: 1 << 32 };
        assert_eq!(g.subcluster_state(z, 0), SubclusterState::Zero);
        assert_eq!(g.subcluster_state(z, 1), SubclusterState::Unallocated);
        assert_eq!(g.make_zero(3), L2Entry { entry: 0, bitmap: SUBCLUSTER_ALL_ZERO });
        let mut t = vec![0u64; 8];
        g.set_entry(&mut t, 2, e);
        assert_eq!(g.entry_at(&t, 2), e);
        assert_eq!(g.entry_at(&t, 100), L2Entry::default());
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
