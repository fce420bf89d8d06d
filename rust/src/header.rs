//! `QcowHeader`: the qcow2 header (versions 2 and 3), its extensions and the backing file name.
//!
//! Parsing validates every field against the spec and against the real length of the file, so
//! that later allocations sized from header fields are bounded by the file itself.

use crate::error::{Error, IoContext, Result};
use crate::format::{
    align_up, be_u32_at, be_u64_at, AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB, COMPRESSION_ZSTD, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END,
    EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
    INCOMPAT_EXTENDED_L2, INCOMPAT_KNOWN, MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFCOUNT_ORDER,
    MAX_SNAPSHOTS, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS, QCOW_MAGIC, V2_HEADER_LEN, V3_MIN_HEADER_LEN,
};
use crate::raw_file::QcowRawFile;
use crate::storage::Storage;

/// Byte offsets of the header fields (for error messages and in-place updates).
pub mod field_offset {
    /// `magic`
    pub const MAGIC: u64 = 0;
    /// `version`
    pub const VERSION: u64 = 4;
    /// `backing_file_offset`
    pub const BACKING_FILE_OFFSET: u64 = 8;
    /// `backing_file_size`
    pub const BACKING_FILE_SIZE: u64 = 16;
    /// `cluster_bits`
    pub const CLUSTER_BITS: u64 = 20;
    /// `size`
    pub const SIZE: u64 = 24;
    /// `crypt_method`
    pub const CRYPT_METHOD: u64 = 32;
    /// `l1_size`
    pub const L1_SIZE: u64 = 36;
    /// `l1_table_offset`
    pub const L1_TABLE_OFFSET: u64 = 40;
    /// `refcount_table_offset`
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    /// `refcount_table_clusters`
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    /// `nb_snapshots`
    pub const NB_SNAPSHOTS: u64 = 60;
    /// `snapshots_offset`
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    /// `incompatible_features`
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    /// `compatible_features`
    pub const COMPATIBLE_FEATURES: u64 = 80;
    /// `autoclear_features`
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    /// `refcount_order`
    pub const REFCOUNT_ORDER: u64 = 96;
    /// `header_length`
    pub const HEADER_LENGTH: u64 = 100;
    /// `compression_type`
    pub const COMPRESSION_TYPE: u64 = 104;
}
use field_offset as fo;

/// One header extension, kept verbatim (known ones are also decoded into `QcowHeader` fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderExtension {
    /// Extension type (e.g. `0xE2792ACA`).
    pub kind: u32,
    /// Extension data, without padding.
    pub data: Vec<u8>,
}

/// The bitmaps extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub bitmap_directory_size: u64,
    /// Offset of the bitmap directory.
    pub bitmap_directory_offset: u64,
}

/// An entry of the feature name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name.
    pub name: String,
}

/// The parsed qcow2 header. Field names are the spec's.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct QcowHeader {
    pub magic: u32,
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Header bytes past `compression_type` up to `header_length` (unknown fields, padding),
    /// kept so that a rewrite preserves them.
    pub extra_header_bytes: Vec<u8>,
    /// All header extensions in on-disk order (known and unknown).
    pub extensions: Vec<HeaderExtension>,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
}

/// Reads `buf.len()` bytes at offset 0 (the file is known to be at least that long).
fn read_exact(file: &dyn Storage, buf: &mut [u8], what: &str) -> Result<()> {
    let n = file.read_at(buf, 0).ctx(|| what.to_string())?;
    if n < buf.len() {
        return Err(Error::corrupt(format!("{what}: the file ended after {n} bytes"), n as u64));
    }
    Ok(())
}

fn ext_string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

impl QcowHeader {
    /// Reads cluster 0 and parses the header in it (structure only); returns it and the file's
    /// length.
    fn read_cluster0(file: &dyn Storage) -> Result<(Self, u64)> {
        let file_len = file.len().ctx(|| "reading the image file's length".to_string())?;
        if file_len < 4 {
            return Err(Error::InvalidMagic(format!(
                "not a qcow2 image: file is {file_len} bytes, too short for the 'magic' field at 0x0"
            )));
        }
        let mut first = vec![0u8; usize::try_from(file_len.min(u64::from(V3_MIN_HEADER_LEN) + 8)).unwrap_or(112)];
        read_exact(file, &mut first, "reading qcow2 header at 0x0")?;
        let magic = be_u32_at(&first, 0);
        if magic != QCOW_MAGIC {
            return Err(Error::InvalidMagic(format!(
                "not a qcow2 image: field 'magic' at 0x0 is 0x{magic:08x}, expected 0x{QCOW_MAGIC:08x} (\"QFI\\xfb\")"
            )));
        }
        if first.len() < 8 {
            return Err(Error::corrupt(
                format!("header truncated: file is {file_len} bytes, shorter than field 'version'"),
                fo::VERSION,
            ));
        }
        let version = be_u32_at(&first, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let min_len = if version == 2 { V2_HEADER_LEN } else { V3_MIN_HEADER_LEN };
        if first.len() < min_len as usize {
            return Err(Error::corrupt(
                format!("header truncated: file is {file_len} bytes, a version {version} header needs {min_len}"),
                0,
            ));
        }
        let cluster_bits = be_u32_at(&first, fo::CLUSTER_BITS as usize);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::InvalidClusterSize(format!(
                "field 'cluster_bits' at header offset 0x{:x} is {cluster_bits}; it must be {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)",
                fo::CLUSTER_BITS
            )));
        }
        // Everything else (header, extensions, backing name) lives in cluster 0.
        let cluster0_len = file_len.min(1u64 << cluster_bits);
        let mut cluster0 = vec![0u8; usize::try_from(cluster0_len).unwrap_or(0)];
        read_exact(file, &mut cluster0, "reading cluster 0 (header and extensions)")?;
        Ok((Self::parse(&cluster0)?, file_len))
    }

    /// Reads the header for a check or a repair: its structure and the features it needs
    /// (an encrypted image, unknown incompatible bits, a bad cluster size or refcount width
    /// cannot be checked), but not where its tables lie: those are the check's findings.
    pub fn read_for_check(file: &dyn Storage) -> Result<Self> {
        let (header, _) = Self::read_cluster0(file)?;
        header.validate_features()?;
        Ok(header)
    }

    /// Reads and validates the header of an open image file, except the refcount table fields
    /// (which a repair can rebuild).
    pub fn read_from_lenient(file: &dyn Storage) -> Result<Self> {
        let (header, file_len) = Self::read_cluster0(file)?;
        header.validate(file_len)?;
        Ok(header)
    }

    /// Reads and validates the header like [`QcowHeader::read_from`], including the refcount
    /// table fields.
    pub fn read_from(file: &dyn Storage) -> Result<Self> {
        let header = Self::read_from_lenient(file)?;
        let file_len = file.len().ctx(|| "reading the image file's length".to_string())?;
        header.validate_refcount_table(file_len)?;
        Ok(header)
    }

    /// Parses a header from the bytes of cluster 0 (or as much of it as the file holds).
    /// Checks the structure (magic, version, lengths, extensions); [`QcowHeader::validate`]
    /// checks the values against the file.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        if buf.len() < 8 || be_u32_at(buf, 0) != QCOW_MAGIC {
            return Err(Error::InvalidMagic("not a qcow2 image: field 'magic' at 0x0 is not \"QFI\\xfb\"".to_string()));
        }
        let version = be_u32_at(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let (header_length, refcount_order) = if version == 2 {
            (V2_HEADER_LEN, 4)
        } else {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(Error::corrupt("header truncated before field 'header_length'", 0));
            }
            (be_u32_at(buf, fo::HEADER_LENGTH as usize), be_u32_at(buf, fo::REFCOUNT_ORDER as usize))
        };
        if version == 3 && (header_length < V3_MIN_HEADER_LEN || header_length % 8 != 0) {
            return Err(Error::corrupt(
                format!("field 'header_length' is {header_length}; version 3 needs >= 104 and a multiple of 8"),
                fo::HEADER_LENGTH,
            ));
        }
        if header_length as usize > buf.len() {
            return Err(Error::corrupt(
                format!(
                    "field 'header_length' is {header_length}, beyond cluster 0 or the end of the file (0x{:x})",
                    buf.len()
                ),
                fo::HEADER_LENGTH,
            ));
        }
        let u32f = |o: u64| be_u32_at(buf, o as usize);
        let u64f = |o: u64| be_u64_at(buf, o as usize);
        let (incompatible_features, compatible_features, autoclear_features) = if version == 3 {
            (u64f(fo::INCOMPATIBLE_FEATURES), u64f(fo::COMPATIBLE_FEATURES), u64f(fo::AUTOCLEAR_FEATURES))
        } else {
            (0, 0, 0)
        };
        let compression_type = if header_length > V3_MIN_HEADER_LEN { buf[fo::COMPRESSION_TYPE as usize] } else { 0 };
        let extra_start =
            if header_length > V3_MIN_HEADER_LEN { V3_MIN_HEADER_LEN as usize + 1 } else { header_length as usize };
        let extra_header_bytes = buf[extra_start..header_length as usize].to_vec();

        let mut h = QcowHeader {
            magic: QCOW_MAGIC,
            version,
            backing_file_offset: u64f(fo::BACKING_FILE_OFFSET),
            backing_file_size: u32f(fo::BACKING_FILE_SIZE),
            cluster_bits: u32f(fo::CLUSTER_BITS),
            size: u64f(fo::SIZE),
            crypt_method: u32f(fo::CRYPT_METHOD),
            l1_size: u32f(fo::L1_SIZE),
            l1_table_offset: u64f(fo::L1_TABLE_OFFSET),
            refcount_table_offset: u64f(fo::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: u32f(fo::REFCOUNT_TABLE_CLUSTERS),
            nb_snapshots: u32f(fo::NB_SNAPSHOTS),
            snapshots_offset: u64f(fo::SNAPSHOTS_OFFSET),
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
            compression_type,
            extra_header_bytes,
            extensions: Vec::new(),
            backing_file: None,
        };

        let ext_end = h.parse_backing_name(buf)?;
        h.parse_extensions(buf, ext_end)?;
        Ok(h)
    }

    /// The backing file name (inside cluster 0, after the extensions); returns where the
    /// extension area ends.
    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<usize> {
        if self.backing_file_offset == 0 {
            return Ok(buf.len());
        }
        if self.backing_file_size > MAX_BACKING_FILE_NAME {
            return Err(Error::corrupt(
                format!(
                    "field 'backing_file_size' is {}, above the limit of {MAX_BACKING_FILE_NAME} bytes",
                    self.backing_file_size
                ),
                fo::BACKING_FILE_SIZE,
            ));
        }
        let end = self.backing_file_offset.checked_add(u64::from(self.backing_file_size));
        match end {
            Some(end) if end <= buf.len() as u64 && self.backing_file_offset >= u64::from(self.header_length) => {}
            _ => {
                return Err(Error::offset(
                    "backing_file_offset",
                    self.backing_file_offset,
                    format!(
                        "with backing_file_size {} lies outside the header area of cluster 0 (0x{:x}..0x{:x})",
                        self.backing_file_size,
                        self.header_length,
                        buf.len()
                    ),
                ))
            }
        }
        // Both bounded by the buffer's length (checked above).
        let start = usize::try_from(self.backing_file_offset).unwrap_or(0);
        let name = &buf[start..start + self.backing_file_size as usize];
        self.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        Ok(start)
    }

    /// The header extensions (v3; v2 images written by QEMU can carry them too), from
    /// `header_length` to `ext_end`. Each type may appear once.
    fn parse_extensions(&mut self, buf: &[u8], ext_end: usize) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        let mut off = self.header_length as usize;
        while off + 8 <= ext_end {
            let kind = be_u32_at(buf, off);
            let len = be_u32_at(buf, off + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data_start = off + 8;
            let data_end = data_start.checked_add(len).filter(|&e| e <= ext_end).ok_or_else(|| {
                Error::corrupt(
                    format!("header extension 0x{kind:08x} of length {len} overruns the header area (ends at 0x{ext_end:x})"),
                    off as u64,
                )
            })?;
            if !seen.insert(kind) {
                return Err(Error::corrupt(format!("header extension 0x{kind:08x} appears twice"), off as u64));
            }
            self.extensions.push(HeaderExtension { kind, data: buf[data_start..data_end].to_vec() });
            off = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Checks the field values an open needs against the spec and the real file length: the
    /// features and the active L1 table. (The snapshot table and the bitmaps are read, bounded
    /// by the file, only when used: an image whose only damage is there still opens.)
    pub fn validate(&self, file_len: u64) -> Result<()> {
        self.validate_features()?;
        self.validate_l1(file_len)?;
        self.validate_snapshot_fields()
    }

    /// As QEMU's open: at most 65536 snapshots, and a cluster-aligned table (a table past the
    /// end of the file does not stop an open: the active disk is still readable).
    pub fn validate_snapshot_fields(&self) -> Result<()> {
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt(
                format!("field 'nb_snapshots' is {}, above QEMU's limit of {MAX_SNAPSHOTS}", self.nb_snapshots),
                fo::NB_SNAPSHOTS,
            ));
        }
        if (self.nb_snapshots > 0 || self.snapshots_offset != 0) && self.snapshots_offset % self.cluster_size() != 0 {
            return Err(Error::offset(
                "snapshots_offset",
                self.snapshots_offset,
                format!("is not aligned to the cluster size 0x{:x}", self.cluster_size()),
            ));
        }
        Ok(())
    }

    /// Cluster size, encryption, feature bits, refcount width and compression type.
    pub fn validate_features(&self) -> Result<()> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Error::InvalidClusterSize(format!(
                "field 'cluster_bits' at header offset 0x{:x} is {}; it must be {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}",
                fo::CLUSTER_BITS,
                self.cluster_bits
            )));
        }
        if self.crypt_method != 0 {
            let method = match self.crypt_method {
                1 => "AES (legacy qcow encryption)",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(Error::UnsupportedFeature(format!(
                "encrypted image: field 'crypt_method' at header offset 0x{:x} is {} ({method}); qcowrs does not decrypt",
                fo::CRYPT_METHOD,
                self.crypt_method
            )));
        }
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| match self.feature_name(0, b) {
                    Some(n) => format!("bit {b} ({n})"),
                    None => format!("bit {b}"),
                })
                .collect();
            return Err(Error::UnsupportedFeature(format!(
                "field 'incompatible_features' at header offset 0x{:x} has unknown bits set: {}",
                fo::INCOMPATIBLE_FEATURES,
                names.join(", ")
            )));
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(Error::corrupt(
                format!(
                    "field 'refcount_order' is {} ({}-bit refcounts); the maximum is {MAX_REFCOUNT_ORDER} (64-bit)",
                    self.refcount_order,
                    1u128 << self.refcount_order.min(100)
                ),
                fo::REFCOUNT_ORDER,
            ));
        }
        self.validate_compression_type()?;
        if self.extended_l2() && self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(Error::InvalidClusterSize(format!(
                "field 'cluster_bits' is {}; extended L2 entries (incompatible_features bit 4) need at least {MIN_EXTENDED_L2_CLUSTER_BITS} (16 KiB clusters)",
                self.cluster_bits
            )));
        }
        if self.has_data_file() && self.data_file().is_none() {
            return Err(Error::corrupt(
                "incompatible_features bit 2 (external data file) is set but there is no data file name extension",
                fo::INCOMPATIBLE_FEATURES,
            ));
        }
        if self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 && !self.has_data_file() {
            return Err(Error::corrupt(
                "autoclear_features bit 1 (raw external data) is set without incompatible bit 2 (external data file)",
                fo::AUTOCLEAR_FEATURES,
            ));
        }

        Ok(())
    }

    /// `compression_type` and incompatible bit 3 agree, and the type is known.
    fn validate_compression_type(&self) -> Result<()> {
        let has_compression_bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (self.compression_type, has_compression_bit) {
            (COMPRESSION_ZLIB, false) | (COMPRESSION_ZSTD, true) => {}
            (COMPRESSION_ZLIB, true) => {
                return Err(Error::corrupt(
                    "incompatible_features bit 3 (compression type) is set but field 'compression_type' is 0 (zlib)",
                    fo::COMPRESSION_TYPE,
                ))
            }
            (COMPRESSION_ZSTD, false) => {
                return Err(Error::corrupt(
                    "field 'compression_type' is 1 (zstd) but incompatible_features bit 3 is clear",
                    fo::COMPRESSION_TYPE,
                ))
            }
            (t, _) => {
                return Err(Error::UnsupportedFeature(format!(
                    "field 'compression_type' at header offset 0x{:x} is {t}; known types are 0 (zlib) and 1 (zstd)",
                    fo::COMPRESSION_TYPE
                )))
            }
        }
        Ok(())
    }

    /// The active L1 table: its size against the virtual size and QEMU's limit, its place
    /// against the file.
    pub fn validate_l1(&self, file_len: u64) -> Result<()> {
        let cluster_size = self.cluster_size();
        let check_table = |field: &str, offset: u64, bytes: u64, limit: u64| -> Result<()> {
            if offset % cluster_size != 0 {
                return Err(Error::offset(
                    field,
                    offset,
                    format!("is not aligned to the cluster size 0x{cluster_size:x}"),
                ));
            }
            let end = offset.checked_add(bytes);
            match end {
                Some(end) if end <= limit => Ok(()),
                _ => Err(Error::offset(
                    field,
                    offset,
                    format!("with 0x{bytes:x} bytes of table lies past the end of the file (0x{file_len:x})"),
                )),
            }
        };
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt(
                format!(
                    "field 'l1_size' is {} entries, above QEMU's limit of {} (32 MiB)",
                    self.l1_size,
                    MAX_L1_BYTES / 8
                ),
                fo::L1_SIZE,
            ));
        }
        let needed = self.l1_entries_needed();
        if u64::from(self.l1_size) < needed {
            return Err(Error::corrupt(
                format!(
                    "field 'l1_size' is {} entries but the virtual size {} needs {needed} (L1 table too small)",
                    self.l1_size, self.size
                ),
                fo::L1_SIZE,
            ));
        }
        if self.l1_size > 0 || self.l1_table_offset != 0 {
            check_table("l1_table_offset", self.l1_table_offset, l1_bytes, file_len)?;
        }
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(Error::offset("l1_table_offset", 0, "points at the header (cluster 0)"));
        }

        Ok(())
    }

    /// Checks the refcount table fields against the file. Kept apart from [`QcowHeader::validate`]
    /// because a repair can rebuild a missing or broken refcount table.
    pub fn validate_refcount_table(&self, file_len: u64) -> Result<()> {
        let cluster_size = self.cluster_size();
        let check_table = |field: &str, offset: u64, bytes: u64, limit: u64| -> Result<()> {
            if offset % cluster_size != 0 {
                return Err(Error::offset(
                    field,
                    offset,
                    format!("is not aligned to the cluster size 0x{cluster_size:x}"),
                ));
            }
            match offset.checked_add(bytes) {
                Some(end) if end <= limit => Ok(()),
                _ => Err(Error::offset(
                    field,
                    offset,
                    format!("with 0x{bytes:x} bytes of table lies past the end of the file (0x{file_len:x})"),
                )),
            }
        };
        // Refcount table.
        if self.refcount_table_clusters == 0 {
            return Err(Error::InvalidRefcountTableSize(format!(
                "field 'refcount_table_clusters' at header offset 0x{:x} is 0: the image has no refcount table",
                fo::REFCOUNT_TABLE_CLUSTERS
            )));
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters).saturating_mul(cluster_size);
        // The last reftable cluster may be only partly written (like a fresh image's L1).
        let reftable_limit = align_up(file_len, cluster_size).unwrap_or(u64::MAX);
        if reftable_bytes > reftable_limit {
            return Err(Error::InvalidRefcountTableSize(format!(
                "field 'refcount_table_clusters' at header offset 0x{:x} is {} (0x{reftable_bytes:x} bytes), larger than the file (0x{file_len:x})",
                fo::REFCOUNT_TABLE_CLUSTERS,
                self.refcount_table_clusters
            )));
        }
        if self.refcount_table_offset == 0 {
            return Err(Error::offset("refcount_table_offset", 0, "points at the header (cluster 0)"));
        }
        check_table("refcount_table_offset", self.refcount_table_offset, reftable_bytes, reftable_limit)?;
        if self.refcount_table_offset >= file_len {
            return Err(Error::offset(
                "refcount_table_offset",
                self.refcount_table_offset,
                format!("lies past the end of the file (0x{file_len:x})"),
            ));
        }

        Ok(())
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }
    /// Width of a refcount in bits.
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order.min(31)
    }
    /// Incompatible bit 0: refcounts may be stale.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }
    /// Incompatible bit 1: the image is marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }
    /// Compatible bit 0: lazy refcounts.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }
    /// Incompatible bit 4: 128-bit L2 entries with subclusters.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0
    }
    /// Incompatible bit 2: guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }
    /// Autoclear bit 1: the external data file is a raw image of the guest.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }
    /// The minimum L1 size for the virtual size.
    pub fn l1_entries_needed(&self) -> u64 {
        let per_l2 = u128::from(self.l2_entries()) << self.cluster_bits.min(63);
        let n = u128::from(self.size).div_ceil(per_l2.max(1));
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// Where the header extension of type `kind` starts in the file (its type field).
    pub fn extension_offset(&self, kind: u32) -> Option<u64> {
        let mut off = u64::from(self.header_length);
        for e in &self.extensions {
            if e.kind == kind {
                return Some(off);
            }
            off += 8 + (e.data.len() as u64).div_ceil(8) * 8;
        }
        None
    }

    fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions.iter().find(|e| e.kind == kind).map(|e| e.data.as_slice())
    }
    /// Backing file format from its extension ("qcow2", "raw", ...).
    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT).map(ext_string)
    }
    /// External data file name from its extension.
    pub fn data_file(&self) -> Option<String> {
        self.extension(EXT_DATA_FILE).map(ext_string)
    }
    /// The bitmaps extension, if present and well formed.
    pub fn bitmaps(&self) -> Option<BitmapsExtension> {
        let d = self.extension(EXT_BITMAPS)?;
        if d.len() < 24 {
            return None;
        }
        Some(BitmapsExtension {
            nb_bitmaps: be_u32_at(d, 0),
            bitmap_directory_size: be_u64_at(d, 8),
            bitmap_directory_offset: be_u64_at(d, 16),
        })
    }
    /// The full disk encryption header pointer `(offset, length)`, if present.
    pub fn crypto_header(&self) -> Option<(u64, u64)> {
        let d = self.extension(EXT_CRYPTO)?;
        (d.len() >= 16).then(|| (be_u64_at(d, 0), be_u64_at(d, 8)))
    }
    /// The feature name table.
    pub fn feature_names(&self) -> Vec<FeatureName> {
        self.extension(EXT_FEATURE_TABLE)
            .map(|d| {
                d.chunks_exact(48).map(|c| FeatureName { kind: c[0], bit: c[1], name: ext_string(&c[2..]) }).collect()
            })
            .unwrap_or_default()
    }
    fn feature_name(&self, kind: u8, bit: u32) -> Option<String> {
        self.feature_names().into_iter().find(|f| f.kind == kind && u32::from(f.bit) == bit).map(|f| f.name)
    }

    /// Switches the image to another refcount table: `refcount_table_offset` and
    /// `refcount_table_clusters` in one 12-byte write, then a sync. The commit point of every
    /// refcount-structure change: the new table and its refblocks must already be durable.
    pub fn commit_refcount_table(&mut self, raw: &QcowRawFile, offset: u64, clusters: u32) -> Result<()> {
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&offset.to_be_bytes());
        b[8..].copy_from_slice(&clusters.to_be_bytes());
        raw.write_at(&b, fo::REFCOUNT_TABLE_OFFSET, "header (refcount_table_offset, refcount_table_clusters)")?;
        raw.sync()?;
        self.refcount_table_offset = offset;
        self.refcount_table_clusters = clusters;
        Ok(())
    }

    /// Switches the image to another active L1 table: `l1_size` and `l1_table_offset` in one
    /// 12-byte write, then a sync (the new table must already be durable).
    pub fn commit_l1_table(&mut self, raw: &QcowRawFile, l1_size: u32, offset: u64) -> Result<()> {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&l1_size.to_be_bytes());
        b[4..].copy_from_slice(&offset.to_be_bytes());
        raw.write_at(&b, fo::L1_SIZE, "header (l1_size, l1_table_offset)")?;
        raw.sync()?;
        self.l1_size = l1_size;
        self.l1_table_offset = offset;
        Ok(())
    }

    /// Writes `incompatible_features` (v3 only; a no-op when unchanged), then a sync.
    pub fn commit_incompatible_features(&mut self, raw: &QcowRawFile, value: u64) -> Result<()> {
        if self.version < 3 || self.incompatible_features == value {
            return Ok(());
        }
        raw.write_at(&value.to_be_bytes(), fo::INCOMPATIBLE_FEATURES, "header (incompatible_features)")?;
        raw.sync()?;
        self.incompatible_features = value;
        Ok(())
    }

    /// Writes `autoclear_features` (v3 only), then a sync.
    pub fn commit_autoclear_features(&mut self, raw: &QcowRawFile, value: u64) -> Result<()> {
        if self.version < 3 || self.autoclear_features == value {
            return Ok(());
        }
        raw.write_at(&value.to_be_bytes(), fo::AUTOCLEAR_FEATURES, "header (autoclear_features)")?;
        raw.sync()?;
        self.autoclear_features = value;
        Ok(())
    }

    /// Switches the image to another refcount structure of another width: the header from
    /// `refcount_table_offset` to `refcount_order` (bytes 48..100, one write inside the first
    /// sector, so it lands whole or not at all), then a sync. The new table and its refblocks
    /// (encoded with `order`) must already be durable.
    pub fn commit_refcount_structure(
        &mut self,
        raw: &QcowRawFile,
        offset: u64,
        clusters: u32,
        order: u32,
    ) -> Result<()> {
        let mut next = self.clone();
        next.refcount_table_offset = offset;
        next.refcount_table_clusters = clusters;
        next.refcount_order = order;
        let bytes = next.to_bytes()?;
        let (from, to) = (fo::REFCOUNT_TABLE_OFFSET as usize, fo::HEADER_LENGTH as usize);
        let what = "header (refcount_table_offset .. refcount_order)";
        raw.write_at(&bytes[from..to], fo::REFCOUNT_TABLE_OFFSET, what)?;
        raw.sync()?;
        *self = next;
        Ok(())
    }

    /// Switches the virtual size and the active L1 table together: bytes 24..48 (`size`,
    /// `crypt_method`, `l1_size`, `l1_table_offset`) in one write inside the first sector, then
    /// a sync (the new table must already be durable).
    pub fn commit_size_and_l1(&mut self, raw: &QcowRawFile, size: u64, l1_size: u32, offset: u64) -> Result<()> {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&size.to_be_bytes());
        b[8..12].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[12..16].copy_from_slice(&l1_size.to_be_bytes());
        b[16..].copy_from_slice(&offset.to_be_bytes());
        raw.write_at(&b, fo::SIZE, "header (size, l1_size, l1_table_offset)")?;
        raw.sync()?;
        self.size = size;
        self.l1_size = l1_size;
        self.l1_table_offset = offset;
        Ok(())
    }

    /// Writes `compatible_features` (v3 only), then a sync.
    pub fn commit_compatible_features(&mut self, raw: &QcowRawFile, value: u64) -> Result<()> {
        if self.version < 3 || self.compatible_features == value {
            return Ok(());
        }
        raw.write_at(&value.to_be_bytes(), fo::COMPATIBLE_FEATURES, "header (compatible_features)")?;
        raw.sync()?;
        self.compatible_features = value;
        Ok(())
    }

    /// Writes the virtual `size`, then a sync.
    pub fn commit_size(&mut self, raw: &QcowRawFile, size: u64) -> Result<()> {
        raw.write_at(&size.to_be_bytes(), fo::SIZE, "header (size)")?;
        raw.sync()?;
        self.size = size;
        Ok(())
    }

    /// Switches the image to another bitmap directory (`None`: no bitmaps), then a sync; the
    /// directory and everything it names must already be durable. With bitmaps the autoclear
    /// bit 0 is set (the extension is consistent), without them it is cleared and the extension
    /// dropped. When the extension is already there and its 24 bytes lie in one sector, one
    /// write of them (a sector is written whole); otherwise the header area is rewritten
    /// (`commit_header_area`, torn-write safe). QEMU's optional feature name table is left out
    /// when the header would not fit in its cluster otherwise.
    pub(crate) fn commit_bitmaps_extension(&mut self, raw: &QcowRawFile, ext: Option<BitmapsExtension>) -> Result<()> {
        let data = ext.map(|e| {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&e.nb_bitmaps.to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes());
            d.extend_from_slice(&e.bitmap_directory_size.to_be_bytes());
            d.extend_from_slice(&e.bitmap_directory_offset.to_be_bytes());
            d
        });
        let in_place = match (&data, self.extension_offset(EXT_BITMAPS)) {
            (Some(d), Some(at)) if self.autoclear_features & AUTOCLEAR_BITMAPS != 0 => {
                let from = at + 8;
                let len = self.extension(EXT_BITMAPS).map_or(0, <[u8]>::len);
                (len == d.len() && from / 512 == (from + 23) / 512).then_some((from, d))
            }
            _ => None,
        };
        if let Some((from, d)) = in_place {
            raw.write_at(d, from, "header (bitmaps extension)")?;
            raw.sync()?;
            if let Some(e) = self.extensions.iter_mut().find(|e| e.kind == EXT_BITMAPS) {
                e.data.clone_from(d);
            }
            return Ok(());
        }
        let mut next = self.clone();
        match data {
            Some(d) => {
                next.autoclear_features |= AUTOCLEAR_BITMAPS;
                if let Some(e) = next.extensions.iter_mut().find(|e| e.kind == EXT_BITMAPS) {
                    e.data = d;
                } else {
                    // QEMU's order: backing format, data file, crypto header, feature table,
                    // bitmaps.
                    let at = next
                        .extensions
                        .iter()
                        .position(|e| {
                            ![EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_CRYPTO, EXT_FEATURE_TABLE].contains(&e.kind)
                        })
                        .unwrap_or(next.extensions.len());
                    next.extensions.insert(at, HeaderExtension { kind: EXT_BITMAPS, data: d });
                }
            }
            None => {
                next.autoclear_features &= !AUTOCLEAR_BITMAPS;
                next.extensions.retain(|e| e.kind != EXT_BITMAPS);
            }
        }
        if next.to_bytes().is_err() {
            next.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
        }
        self.commit_header_area(raw, &next)
    }

    /// Rewrites the header area of cluster 0 (`self` is what is on disk) as `new` describes
    /// it, so that a crash or a power cut, even one that tears a write into its 512-byte
    /// sectors, leaves one of the two headers (or, between them, the old one without its
    /// feature name table). When only the first sector changes, one write (a sector is
    /// written whole). Otherwise in steps, each synced, each either a one-sector write or a
    /// write to bytes the header on disk does not read: the old backing name copied to the end
    /// of cluster 0; the first sector rewritten to name it there, with the extensions that fit
    /// (the feature name table, names for tools, dropped); the rest of the new area; the new
    /// first sector; the bytes after the new area zeroed. When even that does not fit (clusters
    /// of 1 or 2 KiB with long names or many extensions), one write, as QEMU's
    /// `qcow2_update_header` does.
    pub(crate) fn commit_header_area(&mut self, raw: &QcowRawFile, new: &QcowHeader) -> Result<()> {
        const SECTOR: usize = 512;
        let what = "header (rewritten)";
        let bytes = new.to_bytes()?;
        let cs = usize::try_from(self.cluster_size()).unwrap_or(usize::MAX);
        let old_name = self.backing_file.clone().unwrap_or_default();
        let old_end = self
            .to_bytes()?
            .len()
            .max(usize::try_from(self.backing_file_offset + u64::from(self.backing_file_size)).unwrap_or(usize::MAX));
        let disk = raw.read_available(0, old_end.max(bytes.len()).min(cs) as u64)?;
        let tail_same = bytes.len() <= SECTOR || disk.get(SECTOR..bytes.len()) == Some(&bytes[SECTOR..]);
        // The old name's new place: the end of cluster 0, past both areas, sector aligned.
        let at = cs.saturating_sub(old_name.len()) / SECTOR * SECTOR;
        let mut mid = self.clone();
        mid.backing_file = None;
        mid.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
        let mut first = mid.to_bytes()?;
        let fits = first.len() <= SECTOR && at >= old_end.max(bytes.len()).div_ceil(SECTOR) * SECTOR;
        if tail_same || !fits {
            raw.write_at(&bytes, 0, what)?;
            raw.sync()?;
        } else {
            if !old_name.is_empty() {
                raw.write_at(old_name.as_bytes(), at as u64, "header (backing name, moved)")?;
                raw.sync()?;
                first[fo::BACKING_FILE_OFFSET as usize..][..8].copy_from_slice(&(at as u64).to_be_bytes());
                first[fo::BACKING_FILE_SIZE as usize..][..4]
                    .copy_from_slice(&u32::try_from(old_name.len()).unwrap_or(u32::MAX).to_be_bytes());
            }
            // The whole sector: past the area, zeros end the extensions of a v2 header.
            first.resize(SECTOR.min(cs), 0);
            raw.write_at(&first, 0, "header (first sector, old backing name moved)")?;
            raw.sync()?;
            raw.write_at(&bytes[SECTOR..], SECTOR as u64, what)?;
            raw.sync()?;
            let mut head = bytes[..SECTOR].to_vec();
            head.resize(SECTOR.min(cs), 0);
            raw.write_at(&head, 0, "header (first sector)")?;
            raw.sync()?;
            let end = at + old_name.len();
            if end > bytes.len().max(SECTOR) {
                let from = bytes.len().max(SECTOR);
                raw.write_at(&vec![0u8; end - from], from as u64, "header (after the area)")?;
                raw.sync()?;
            }
        }
        *self = QcowHeader::read_from(&**raw.storage())?;
        Ok(())
    }

    /// Serializes the header, its extensions and the backing file name: the bytes of cluster 0
    /// up to the end of the backing name. `backing_file_offset`/`backing_file_size` are
    /// recomputed. Fails if the result does not fit in one cluster.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut h = self.clone();
        let mut out = vec![0u8; h.header_length as usize];
        let mut exts = Vec::new();
        for e in &h.extensions {
            exts.extend_from_slice(&e.kind.to_be_bytes());
            let len = u32::try_from(e.data.len()).map_err(|_| Error::corrupt("header extension too large", 0))?;
            exts.extend_from_slice(&len.to_be_bytes());
            exts.extend_from_slice(&e.data);
            exts.resize(exts.len().div_ceil(8) * 8, 0);
        }
        if h.version == 3 || !h.extensions.is_empty() {
            exts.extend_from_slice(&[0u8; 8]);
        }
        let backing = h.backing_file.clone().unwrap_or_default();
        if backing.is_empty() {
            h.backing_file_offset = 0;
            h.backing_file_size = 0;
        } else {
            h.backing_file_offset = u64::from(h.header_length) + exts.len() as u64;
            h.backing_file_size = u32::try_from(backing.len()).unwrap_or(u32::MAX);
            if h.backing_file_size > MAX_BACKING_FILE_NAME {
                return Err(Error::corrupt(
                    format!("backing file name is {} bytes, above 1023", backing.len()),
                    fo::BACKING_FILE_SIZE,
                ));
            }
        }
        let put32 =
            |out: &mut Vec<u8>, o: u64, v: u32| out[o as usize..o as usize + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |out: &mut Vec<u8>, o: u64, v: u64| out[o as usize..o as usize + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut out, fo::MAGIC, h.magic);
        put32(&mut out, fo::VERSION, h.version);
        put64(&mut out, fo::BACKING_FILE_OFFSET, h.backing_file_offset);
        put32(&mut out, fo::BACKING_FILE_SIZE, h.backing_file_size);
        put32(&mut out, fo::CLUSTER_BITS, h.cluster_bits);
        put64(&mut out, fo::SIZE, h.size);
        put32(&mut out, fo::CRYPT_METHOD, h.crypt_method);
        put32(&mut out, fo::L1_SIZE, h.l1_size);
        put64(&mut out, fo::L1_TABLE_OFFSET, h.l1_table_offset);
        put64(&mut out, fo::REFCOUNT_TABLE_OFFSET, h.refcount_table_offset);
        put32(&mut out, fo::REFCOUNT_TABLE_CLUSTERS, h.refcount_table_clusters);
        put32(&mut out, fo::NB_SNAPSHOTS, h.nb_snapshots);
        put64(&mut out, fo::SNAPSHOTS_OFFSET, h.snapshots_offset);
        if h.version == 3 {
            put64(&mut out, fo::INCOMPATIBLE_FEATURES, h.incompatible_features);
            put64(&mut out, fo::COMPATIBLE_FEATURES, h.compatible_features);
            put64(&mut out, fo::AUTOCLEAR_FEATURES, h.autoclear_features);
            put32(&mut out, fo::REFCOUNT_ORDER, h.refcount_order);
            put32(&mut out, fo::HEADER_LENGTH, h.header_length);
            if h.header_length > V3_MIN_HEADER_LEN {
                out[fo::COMPRESSION_TYPE as usize] = h.compression_type;
                let start = V3_MIN_HEADER_LEN as usize + 1;
                let n = h.extra_header_bytes.len().min(out.len() - start);
                out[start..start + n].copy_from_slice(&h.extra_header_bytes[..n]);
            }
        }
        out.extend_from_slice(&exts);
        out.extend_from_slice(backing.as_bytes());
        if out.len() as u64 > h.cluster_size() {
            return Err(Error::corrupt(
                format!("header, extensions and backing name take {} bytes, more than one cluster", out.len()),
                0,
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A parsed valid v3 header (64 MiB, 64 KiB clusters), for tests of other modules.
    pub(crate) fn header_for_tests() -> QcowHeader {
        QcowHeader::parse(&valid_v3()).unwrap()
    }

    /// A valid v3 header for a 64 MiB image with 64 KiB clusters, as `qemu-img create` makes it.
    pub(crate) fn valid_v3() -> Vec<u8> {
        let mut b = vec![0u8; 0x10000];
        let p32 = |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let p64 = |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        p32(&mut b, 0, QCOW_MAGIC);
        p32(&mut b, 4, 3);
        p32(&mut b, 20, 16);
        p64(&mut b, 24, 64 << 20);
        p32(&mut b, 36, 1);
        p64(&mut b, 40, 0x30000);
        p64(&mut b, 48, 0x10000);
        p32(&mut b, 56, 1);
        p32(&mut b, 96, 4);
        p32(&mut b, 100, 112);
        b
    }

    #[test]
    fn parses_valid_v3() {
        let h = QcowHeader::parse(&valid_v3()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        h.validate(0x30008).unwrap();
    }

    #[test]
    fn roundtrip_bytes() {
        let mut h = QcowHeader::parse(&valid_v3()).unwrap();
        h.backing_file = Some("base.qcow2".into());
        h.extensions.push(HeaderExtension { kind: EXT_BACKING_FORMAT, data: b"qcow2".to_vec() });
        let bytes = h.to_bytes().unwrap();
        let mut cluster = bytes.clone();
        cluster.resize(0x10000, 0);
        let h2 = QcowHeader::parse(&cluster).unwrap();
        assert_eq!(h2.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(h2.backing_format().as_deref(), Some("qcow2"));
        assert_eq!(h2.to_bytes().unwrap(), bytes);
    }

    fn patched(o: usize, v: &[u8]) -> Result<()> {
        let mut b = valid_v3();
        b[o..o + v.len()].copy_from_slice(v);
        {
            let h = QcowHeader::parse(&b)?;
            h.validate(0x30008)?;
            h.validate_refcount_table(0x30008)
        }
    }

    #[test]
    fn rejects_each_bad_field() {
        assert!(matches!(patched(0, b"QFI\xfa"), Err(Error::InvalidMagic(_))));
        assert!(matches!(patched(4, &4u32.to_be_bytes()), Err(Error::UnsupportedVersion(4))));
        assert!(matches!(patched(20, &8u32.to_be_bytes()), Err(Error::InvalidClusterSize(_))));
        assert!(matches!(patched(20, &22u32.to_be_bytes()), Err(Error::InvalidClusterSize(_))));
        assert!(
            matches!(patched(32, &2u32.to_be_bytes()), Err(Error::UnsupportedFeature(m)) if m.contains("crypt_method"))
        );
        assert!(
            matches!(patched(36, &0u32.to_be_bytes()), Err(Error::CorruptImage { what, .. }) if what.contains("l1_size"))
        );
        assert!(
            matches!(patched(40, &0x30200u64.to_be_bytes()), Err(Error::InvalidOffset { field, .. }) if field == "l1_table_offset")
        );
        assert!(
            matches!(patched(48, &0x10200u64.to_be_bytes()), Err(Error::InvalidOffset { field, .. }) if field == "refcount_table_offset")
        );
        assert!(matches!(patched(56, &0u32.to_be_bytes()), Err(Error::InvalidRefcountTableSize(_))));
        assert!(
            matches!(patched(72, &(1u64 << 40).to_be_bytes()), Err(Error::UnsupportedFeature(m)) if m.contains("incompatible_features"))
        );
        assert!(
            matches!(patched(96, &7u32.to_be_bytes()), Err(Error::CorruptImage { what, .. }) if what.contains("refcount_order"))
        );
        assert!(matches!(patched(100, &20u32.to_be_bytes()), Err(Error::CorruptImage { .. })));
    }
}
