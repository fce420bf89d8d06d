//! L1/L2 translation: what a guest offset maps to. Pure functions over decoded L2 entries; the
//! I/O is done by `QcowFile`.

use crate::error::{Error, Result};
use crate::format::{CompressedLayout, L2E_COMPRESSED, L2E_COPIED, L2E_OFFSET_MASK, L2E_ZERO, SUBCLUSTERS};

/// What one guest range (inside one cluster) maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterMapping {
    /// Not allocated here: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros (zero flag, or extended-L2 zero bit). `host` is the preallocated cluster,
    /// if any.
    Zero {
        /// Preallocated host cluster (0 when none).
        host: u64,
    },
    /// Stored uncompressed at this host offset (of the data file, if the image has one); the
    /// offset is that of the guest offset asked for, not of the cluster start.
    Data {
        /// Host offset of the first byte.
        host: u64,
    },
    /// The whole cluster is compressed at `[host, host+len)` of the image file.
    Compressed {
        /// Host byte offset of the compressed stream.
        host: u64,
        /// Bytes the stream may occupy (whole sectors).
        len: u64,
    },
}

impl ClusterMapping {
    /// The `allocated_ranges` kind of this mapping, or `None` when not present in this image.
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            ClusterMapping::Unallocated => None,
            ClusterMapping::Zero { .. } => Some("zero"),
            ClusterMapping::Data { .. } => Some("data"),
            ClusterMapping::Compressed { .. } => Some("compressed"),
        }
    }
}

/// Geometry needed to interpret L2 entries.
#[derive(Clone, Copy, Debug)]
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

/// Maps the byte at `in_cluster` of a cluster whose L2 entry is `entry` (and subcluster bitmap
/// `bitmap`, 0 for standard entries). Returns the mapping and how many bytes from `in_cluster`
/// on (up to the end of the cluster) share it. `where_` names the entry for error messages.
pub fn map_entry(
    geo: &L2Geometry,
    entry: u64,
    bitmap: u64,
    in_cluster: u64,
    where_: &dyn Fn() -> (String, u64),
) -> Result<(ClusterMapping, u64)> {
    let cluster_size = 1u64 << geo.cluster_bits;
    let to_end = cluster_size - in_cluster;
    if entry & L2E_COMPRESSED != 0 {
        if geo.extended && bitmap != 0 {
            let (w, o) = where_();
            return Err(Error::corrupt(
                format!("{w}: compressed cluster with a non-zero subcluster bitmap 0x{bitmap:x}"),
                o,
            ));
        }
        let (host, len) = geo.compressed.decode(entry & !(L2E_COPIED | L2E_COMPRESSED));
        return Ok((ClusterMapping::Compressed { host, len }, to_end));
    }
    let offset = entry & L2E_OFFSET_MASK;
    let allocated = offset != 0 || (geo.data_file && entry & L2E_COPIED != 0);
    if allocated && offset & (cluster_size - 1) != 0 {
        let (w, o) = where_();
        return Err(Error::corrupt(format!("{w}: data cluster offset 0x{offset:x} is not cluster aligned"), o));
    }
    if !geo.extended {
        let m = if entry & L2E_ZERO != 0 {
            ClusterMapping::Zero { host: offset }
        } else if allocated {
            ClusterMapping::Data { host: offset + in_cluster }
        } else {
            ClusterMapping::Unallocated
        };
        return Ok((m, to_end));
    }
    // Extended L2: 32 subclusters, bits 0-31 allocated, 32-63 reads-as-zero.
    let alloc_bits = bitmap & 0xffff_ffff;
    let zero_bits = bitmap >> 32;
    if alloc_bits & zero_bits != 0 {
        let (w, o) = where_();
        return Err(Error::corrupt(
            format!("{w}: subcluster bitmap 0x{bitmap:016x} marks subclusters both allocated and zero"),
            o,
        ));
    }
    if !allocated && alloc_bits != 0 {
        let (w, o) = where_();
        return Err(Error::corrupt(
            format!("{w}: unallocated cluster with allocated subclusters (bitmap 0x{bitmap:016x})"),
            o,
        ));
    }
    let sc_bits = geo.cluster_bits - SUBCLUSTERS.trailing_zeros();
    let sc = in_cluster >> sc_bits;
    let state = |i: u64| (alloc_bits >> i & 1, zero_bits >> i & 1);
    let s0 = state(sc);
    let mut last = sc;
    while last + 1 < u64::from(SUBCLUSTERS) && state(last + 1) == s0 {
        last += 1;
    }
    let run = ((last + 1) << sc_bits) - in_cluster;
    let m = match s0 {
        (1, _) => ClusterMapping::Data { host: offset + in_cluster },
        (_, 1) => ClusterMapping::Zero { host: offset },
        _ => ClusterMapping::Unallocated,
    };
    Ok((m, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(extended: bool) -> L2Geometry {
        L2Geometry { cluster_bits: 16, extended, data_file: false, compressed: CompressedLayout::new(16) }
    }
    fn nowhere() -> (String, u64) {
        ("L2[0]".into(), 0)
    }

    #[test]
    fn standard_entries() {
        let g = geo(false);
        assert_eq!(map_entry(&g, 0, 0, 0, &nowhere).unwrap(), (ClusterMapping::Unallocated, 65536));
        assert_eq!(
            map_entry(&g, L2E_COPIED | 0x50000, 0, 100, &nowhere).unwrap(),
            (ClusterMapping::Data { host: 0x50064 }, 65436)
        );
        assert_eq!(map_entry(&g, 1, 0, 0, &nowhere).unwrap().0, ClusterMapping::Zero { host: 0 });
        // Offset 0 with COPIED and no data file is unallocated (QEMU's classification).
        assert_eq!(map_entry(&g, L2E_COPIED, 0, 0, &nowhere).unwrap().0, ClusterMapping::Unallocated);
        assert!(map_entry(&g, 0x50200, 0, 0, &nowhere).is_err());
    }

    #[test]
    fn subclusters() {
        let g = geo(true);
        // Subclusters 0-1 allocated, 2 zero, rest unallocated; subcluster size 2 KiB.
        let bitmap = 0b11 | (0b100u64 << 32);
        assert_eq!(
            map_entry(&g, 0x50000, bitmap, 0, &nowhere).unwrap(),
            (ClusterMapping::Data { host: 0x50000 }, 4096)
        );
        assert_eq!(
            map_entry(&g, 0x50000, bitmap, 4096, &nowhere).unwrap(),
            (ClusterMapping::Zero { host: 0x50000 }, 2048)
        );
        assert_eq!(
            map_entry(&g, 0x50000, bitmap, 6144, &nowhere).unwrap(),
            (ClusterMapping::Unallocated, 65536 - 6144)
        );
        assert!(map_entry(&g, 0x50000, 1 | (1 << 32), 0, &nowhere).is_err());
        assert!(map_entry(&g, 0, 1, 0, &nowhere).is_err());
    }
}
