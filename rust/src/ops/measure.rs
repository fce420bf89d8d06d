//! `qemu-img measure`: how many bytes a new image needs, for an empty disk of a given size or
//! for the guest content of an existing image (qcow2 with its backing chain, or raw) as
//! `qemu-img convert` would copy it.
//!
//! QEMU's rules, reproduced here (`block/qcow2.c` `qcow2_measure` and
//! `qcow2_calc_prealloc_size`, `block/raw-format.c` `raw_measure`,
//! `block/qcow2-bitmap.c` `qcow2_get_persistent_dirty_bitmap_size`, `qemu-img.c`
//! `img_measure`; checked against qemu-img 10):
//!
//! * **fully-allocated** (qcow2): the virtual size rounded up to a cluster, plus a header
//!   cluster, the L2 tables of every cluster (whole tables), the L1 table (whole clusters of
//!   entries), and the refcount blocks and table that count all of it
//!   (`qcow2_refcount_metadata_size`, not generous). A LUKS header would add its clusters;
//!   qcowrs has no encryption.
//! * **required** (qcow2) = fully-allocated − the virtual size (rounded) + the data: the
//!   metadata of the fully allocated image is always counted (an overestimate QEMU accepts).
//!   The data is 0 for `--size`; for a source, one whole target cluster for every target
//!   cluster that holds a byte the source's block status (over its whole chain) calls data
//!   and not zero. Zero clusters, unallocated ranges, holes of raw files, and data clusters
//!   of a metadata-preallocated image that are holes in its file count nothing; compressed
//!   clusters count as whole clusters. With `preallocation=falloc` or `full`, or with a
//!   `backing_file` option and a source (QEMU cannot know what the new backing file shares),
//!   the data is the whole virtual size. `preallocation=metadata` changes nothing.
//! * **bitmaps** (qcow2 target, compat 1.1, qcow2 v3 source, present even when 0): for each
//!   persistent bitmap of the source image itself (not its backing files; in-use bitmaps
//!   included): its bits for the source's length at its granularity in whole target
//!   clusters, plus its bitmap table (8 bytes per cluster) in whole clusters; plus the bitmap
//!   directory (24 bytes + the name per entry, 8-byte aligned) in whole clusters.
//! * **raw** target: both are the length: `--size` rounded up to 512 bytes, or the source's
//!   guest length.
//! * The source's length is QEMU's: a qcow2 image has whole sectors of its virtual size, a
//!   raw file its length rounded up to a sector.
//! * The options are checked in `qcow2_measure`'s order with its texts, and differ from
//!   `create`'s: `compat` is `0.10` or `1.1` only; the combinations `create` refuses
//!   (lazy refcounts or extended L2 with compat 0.10, data file or compression type values,
//!   backing file with preallocation) are not checked. The size check (L1 table at most
//!   32 MiB) applies to the size option only: with a source, to `-o size=` if given.

use std::path::Path;

use crate::backing::{open_image_any, open_image_snapshot, BackingKind, BackingRead};
use crate::bitmap::read_bitmap_directory;
use crate::create::refcount_metadata_clusters;
use crate::error::{Error, Result};
use crate::format::AUTOCLEAR_BITMAPS;
use crate::ops::convert::OutputFormat;
use crate::ops::map::{map_image, map_layers, raw_extents};
use crate::qcow_file::QcowFile;

/// QEMU's sector: lengths of block nodes are whole sectors.
const SECTOR: u64 = 512;
/// QEMU's `QCOW_MAX_L1_SIZE` (32 MiB): the size check of `qcow2_measure`.
const QCOW_MAX_L1_SIZE: u64 = 32 << 20;
/// QEMU's smallest cluster (`MIN_CLUSTER_BITS`).
const MIN_CLUSTER_SIZE: u64 = 512;
/// QEMU's largest cluster (`MAX_CLUSTER_BITS`).
const MAX_CLUSTER_SIZE: u64 = 2 << 20;
/// Smallest cluster with extended L2 entries (32 subclusters of 512 bytes).
const MIN_EXTENDED_L2_CLUSTER_SIZE: u64 = 16384;
/// Bytes of a bitmap directory entry before its name (`Qcow2BitmapDirEntry`).
const BITMAP_DIR_ENTRY_SIZE: u64 = 24;
/// QEMU's bounds of a bitmap's granularity (`BME_MIN_GRANULARITY_BITS`, `BME_MAX_...`).
const BITMAP_GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;

/// What is measured.
#[derive(Clone, Copy, Debug)]
pub enum MeasureInput<'a> {
    /// `--size`: a new, empty disk of this many bytes.
    Size(u64),
    /// The guest content of this image (qcow2 with its backing chain, or raw), as
    /// `qemu-img convert` would copy it into the new image.
    Source(&'a Path),
}

/// The new image's options, as `qemu-img measure -O FMT -o ...` hands them to the format
/// driver (strings where QEMU checks the text itself), with its defaults.
#[derive(Clone, Debug)]
pub struct MeasureOptions {
    /// `-O`: the format of the new image (qemu-img's default is raw).
    pub output_format: OutputFormat,
    /// `-o size=`: only checked with a source (the source's size is measured); `--size`
    /// ([`MeasureInput::Size`]) replaces it.
    pub size: Option<u64>,
    /// `cluster_size` (qcow2).
    pub cluster_size: u64,
    /// `compat`: `"0.10"` or `"1.1"` (the default); `create`'s `v2`/`v3` are refused here,
    /// as by qemu-img measure.
    pub compat: Option<String>,
    /// `refcount_bits` (16 unless given).
    pub refcount_bits: u64,
    /// `extended_l2`.
    pub extended_l2: bool,
    /// `preallocation`: `"off"` (the default), `"metadata"`, `"falloc"` or `"full"`.
    pub preallocation: Option<String>,
    /// `backing_file`: only whether there is one matters (with a source, every cluster then
    /// counts).
    pub backing_file: Option<String>,
    /// `encrypt.format`: `"luks"` needs a secret, which qcowrs cannot be given (qemu-img's
    /// `--object secret`): refused with qemu-img's message. Other values are ignored, as
    /// qemu-img ignores them.
    pub encrypt_format: Option<String>,
    /// `encrypt.key-secret`: the secret's id, for the message.
    pub encrypt_key_secret: Option<String>,
    /// `-f`: the source's format (`None`: probed).
    pub source_format: Option<String>,
    /// `-U`: read a source another process holds open.
    pub force_share: bool,
    /// `-l`: measure this internal snapshot (id, else name) of the (qcow2) source.
    pub snapshot: Option<String>,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        MeasureOptions {
            output_format: OutputFormat::Raw,
            size: None,
            cluster_size: 65536,
            compat: None,
            refcount_bits: 16,
            extended_l2: false,
            preallocation: None,
            backing_file: None,
            encrypt_format: None,
            encrypt_key_secret: None,
            source_format: None,
            force_share: false,
            snapshot: None,
        }
    }
}

/// What `qemu-img measure` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measurement {
    /// `required`: bytes the new image needs for what is measured (with the metadata of a
    /// fully allocated image).
    pub required: u64,
    /// `fully-allocated`: bytes of the new image with every cluster allocated.
    pub fully_allocated: u64,
    /// `bitmaps`: bytes for the source's persistent bitmaps, where qemu-img reports them (a
    /// qcow2 target of compat 1.1 and a qcow2 v3 source).
    pub bitmaps: Option<u64>,
}

/// Measures `input` as `qemu-img measure` does. A source is opened first (read-only, with
/// QEMU's shared lock unless `force_share`), then the options are checked, as qemu-img
/// orders its errors.
pub fn measure(input: MeasureInput<'_>, opts: &MeasureOptions) -> Result<Measurement> {
    let source = match input {
        MeasureInput::Source(p) => Some(match &opts.snapshot {
            Some(sn) => open_image_snapshot(p, opts.source_format.as_deref(), opts.force_share, sn)?,
            None => open_image_any(p, opts.source_format.as_deref(), opts.force_share)?,
        }),
        MeasureInput::Size(_) => None,
    };
    let size = match input {
        MeasureInput::Size(n) if i64::try_from(n).is_err() => {
            return Err(Error::InvalidArgument(format!(
                "Invalid image size specified. Must be between 0 and {}.",
                i64::MAX
            )))
        }
        MeasureInput::Size(n) => Some(n),
        MeasureInput::Source(_) => None,
    };
    measure_image(size, source.as_deref(), opts)
}

/// [`measure`] of an open source (`None` with `size`).
pub(crate) fn measure_image(
    size: Option<u64>,
    source: Option<&dyn BackingRead>,
    opts: &MeasureOptions,
) -> Result<Measurement> {
    match opts.output_format {
        OutputFormat::Raw => {
            // `raw_measure`: unallocated sectors count towards the file size.
            let required = match source {
                Some(s) => guest_length(s),
                None => round_up(size.or(opts.size).unwrap_or(0), SECTOR)?,
            };
            Ok(Measurement { required, fully_allocated: required, bitmaps: None })
        }
        OutputFormat::Qcow2 => qcow2_measure(size, source, opts),
    }
}

/// The options of a qcow2 target after `qcow2_measure`'s checks.
#[derive(Clone, Copy, Debug)]
struct Qcow2Target {
    cluster_bits: u32,
    version: u32,
    refcount_order: u32,
    extended_l2: bool,
    /// `falloc` or `full`: every data cluster is allocated.
    preallocated: bool,
}

/// `qcow2_measure`'s checks, in its order, with its texts.
fn check_qcow2_options(o: &MeasureOptions) -> Result<Qcow2Target> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
        return Err(Error::InvalidClusterSize("Cluster size must be a power of two between 512 and 2048k".into()));
    }
    if o.extended_l2 && cs < MIN_EXTENDED_L2_CLUSTER_SIZE {
        return Err(Error::InvalidClusterSize(format!(
            "Extended L2 entries are only supported with cluster sizes of at least {MIN_EXTENDED_L2_CLUSTER_SIZE} bytes"
        )));
    }
    let version = match o.compat.as_deref() {
        None | Some("1.1") => 3,
        Some("0.10") => 2,
        Some(other) => return Err(Error::InvalidArgument(format!("Invalid compatibility level: '{other}'"))),
    };
    let bits = o.refcount_bits;
    if !bits.is_power_of_two() || bits > 64 {
        return Err(Error::InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits".into()));
    }
    if version < 3 && bits != 16 {
        return Err(Error::InvalidArgument(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
                .into(),
        ));
    }
    let preallocated = match o.preallocation.as_deref() {
        None | Some("off" | "metadata") => false,
        Some("falloc" | "full") => true,
        Some(other) => return Err(Error::InvalidArgument(format!("invalid parameter value: {other}"))),
    };
    if o.encrypt_format.as_deref() == Some("luks") {
        return Err(Error::InvalidArgument(match &o.encrypt_key_secret {
            None => "Parameter 'encrypt.key-secret' is required for cipher".into(),
            Some(id) => format!("No secret with id '{id}'"),
        }));
    }
    Ok(Qcow2Target {
        cluster_bits: cs.trailing_zeros(),
        version,
        refcount_order: bits.trailing_zeros(),
        extended_l2: o.extended_l2,
        preallocated,
    })
}

fn qcow2_measure(size: Option<u64>, source: Option<&dyn BackingRead>, o: &MeasureOptions) -> Result<Measurement> {
    let t = check_qcow2_options(o)?;
    let cs = 1u64 << t.cluster_bits;
    let l2_entry_size: u64 = if t.extended_l2 { 16 } else { 8 };
    // The size option is checked even with a source (whose size is then measured instead),
    // rounded up as QEMU rounds it: in 64 bits, so that `-o size=` within a cluster of 2^64
    // wraps to 0 and passes.
    let mut virtual_size = size.or(o.size).unwrap_or(0).wrapping_add(cs - 1) & !(cs - 1);
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2_entry_size);
    if l2_tables.saturating_mul(8) > QCOW_MAX_L1_SIZE {
        return Err(Error::InvalidArgument("The image size is too large (try using a larger cluster size)".into()));
    }
    let mut data = 0;
    if let Some(s) = source {
        virtual_size = round_up(guest_length(s), cs)?;
        data = if o.backing_file.is_some() {
            // The new backing file may share nothing with the source: every cluster counts.
            virtual_size
        } else {
            data_clusters(s, cs)?.checked_mul(cs).ok_or_else(too_large)?
        };
    }
    if t.preallocated {
        data = virtual_size;
    }
    let fully_allocated = prealloc_size(virtual_size, t.cluster_bits, t.refcount_order, t.extended_l2)?;
    let required = fully_allocated - virtual_size + data;
    let bitmaps = match source.map(BackingRead::kind) {
        Some(BackingKind::Qcow2(q)) if t.version >= 3 && q.header().version >= 3 => Some(bitmaps_size(q, cs)?),
        _ => None,
    };
    Ok(Measurement { required, fully_allocated, bitmaps })
}

/// `qcow2_calc_prealloc_size`: the bytes of an image of `size` bytes with every cluster
/// allocated.
fn prealloc_size(size: u64, cluster_bits: u32, refcount_order: u32, extended_l2: bool) -> Result<u64> {
    let cs = 1u64 << cluster_bits;
    let l2_entry_size: u64 = if extended_l2 { 16 } else { 8 };
    let aligned = round_up(size, cs)?;
    // Header cluster; L2 tables for every cluster (whole tables); L1 entries for them
    // (whole clusters).
    let l2_entries = round_up(aligned / cs, cs / l2_entry_size)?;
    let l2_bytes = l2_entries * l2_entry_size;
    let l1_entries = round_up(l2_bytes / cs, cs / 8)?;
    let meta = cs + l2_bytes + l1_entries * 8;
    let clusters = (meta.checked_add(aligned).ok_or_else(too_large)?) / cs;
    let (blocks, table) = refcount_metadata_clusters(clusters, cluster_bits, refcount_order, false);
    (blocks + table)
        .checked_mul(cs)
        .and_then(|r| r.checked_add(meta))
        .and_then(|m| m.checked_add(aligned))
        .ok_or_else(too_large)
}

/// Clusters of `cluster_size` bytes that hold a byte of data of `source` (over its whole
/// chain; zeros are no data): `qcow2_measure`'s block-status loop, which extends each data
/// run to the end of its cluster.
fn data_clusters(source: &dyn BackingRead, cluster_size: u64) -> Result<u64> {
    let runs: Vec<(u64, u64)> = match source.kind() {
        BackingKind::Qcow2(q) => map_image(q, 0, None)?
            .entries
            .iter()
            .filter(|e| e.data && !e.zero)
            .map(|e| (e.start, e.start + e.length))
            .collect(),
        BackingKind::Qcow1(q) => map_layers(BackingKind::Qcow1(q), 0, None)?
            .entries
            .iter()
            .filter(|e| e.data && !e.zero)
            .map(|e| (e.start, e.start + e.length))
            .collect(),
        BackingKind::Raw { storage, len, .. } => raw_extents(storage, len)
            .into_iter()
            .filter(|&(_, _, hole)| !hole)
            .map(|(start, end, _)| (start, end))
            .collect(),
    };
    Ok(count_clusters(&runs, cluster_size))
}

/// Clusters touched by `runs` (in guest order), each counted once.
fn count_clusters(runs: &[(u64, u64)], cluster_size: u64) -> u64 {
    let (mut next, mut n) = (0u64, 0u64);
    for &(start, end) in runs {
        if start >= end {
            continue;
        }
        let first = (start / cluster_size).max(next);
        let last = end.div_ceil(cluster_size);
        if last > first {
            n += last - first;
            next = last;
        }
    }
    n
}

/// `qcow2_get_persistent_dirty_bitmap_size`: room for the persistent bitmaps of `q` itself
/// (as QEMU loads them: none unless the bitmaps extension is marked consistent) in an image
/// of `cluster_size` bytes per cluster.
fn bitmaps_size(q: &QcowFile, cluster_size: u64) -> Result<u64> {
    let h = q.header();
    if h.bitmaps().is_none() || h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(0);
    }
    let len = q.virtual_size() / SECTOR * SECTOR;
    let (mut total, mut directory) = (0u64, 0u64);
    for b in read_bitmap_directory(q.raw_file(), h)? {
        if !BITMAP_GRANULARITY_BITS.contains(&b.granularity_bits) {
            return Err(Error::corrupt(
                format!("bitmap '{}': granularity_bits {} outside 9..=31", b.name, b.granularity_bits),
                b.entry_offset,
            ));
        }
        let bytes = len.div_ceil(1u64 << b.granularity_bits).div_ceil(8);
        let clusters = bytes.div_ceil(cluster_size);
        total += clusters * cluster_size + round_up(clusters * 8, cluster_size)?;
        directory += round_up(BITMAP_DIR_ENTRY_SIZE + b.name_len as u64, 8)?;
    }
    Ok(total + round_up(directory, cluster_size)?)
}

/// QEMU's length of an image: whole sectors of a qcow2 virtual size, a raw file rounded up to
/// a sector.
fn guest_length(source: &dyn BackingRead) -> u64 {
    match source.kind() {
        BackingKind::Qcow2(q) => q.virtual_size() / SECTOR * SECTOR,
        BackingKind::Qcow1(q) => q.virtual_size(),
        BackingKind::Raw { len, .. } => len.div_ceil(SECTOR) * SECTOR,
    }
}

fn round_up(n: u64, to: u64) -> Result<u64> {
    n.checked_next_multiple_of(to).ok_or_else(too_large)
}

fn too_large() -> Error {
    Error::InvalidArgument("The image size is too large to measure (beyond 2^64 bytes)".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::storage::MemStorage;

    fn qcow2(opts: &[(&str, &str)]) -> MeasureOptions {
        let mut o = MeasureOptions { output_format: OutputFormat::Qcow2, ..MeasureOptions::default() };
        for &(k, v) in opts {
            match k {
                "cluster_size" => o.cluster_size = v.parse().unwrap(),
                "refcount_bits" => o.refcount_bits = v.parse().unwrap(),
                "compat" => o.compat = Some(v.into()),
                "extended_l2" => o.extended_l2 = v == "on",
                "preallocation" => o.preallocation = Some(v.into()),
                "backing_file" => o.backing_file = Some(v.into()),
                _ => panic!("{k}"),
            }
        }
        o
    }

    fn sized(size: u64, opts: &[(&str, &str)]) -> Result<Measurement> {
        measure_image(Some(size), None, &qcow2(opts))
    }

    fn m(required: u64, fully_allocated: u64) -> Measurement {
        Measurement { required, fully_allocated, bitmaps: None }
    }

    #[test]
    fn sizes_as_qemu_img() {
        // Values printed by qemu-img 10 measure -O qcow2 --size N.
        assert_eq!(sized(0, &[]).unwrap(), m(196_608, 196_608));
        assert_eq!(sized(1, &[]).unwrap(), m(327_680, 393_216));
        assert_eq!(sized(1 << 30, &[]).unwrap(), m(393_216, 1_074_135_040));
        assert_eq!(sized(1 << 50, &[]).unwrap(), m(171_825_102_848, 1_126_071_731_945_472));
        assert_eq!(sized(1 << 30, &[("preallocation", "full")]).unwrap(), m(1_074_135_040, 1_074_135_040));
        assert_eq!(sized(1 << 30, &[("preallocation", "metadata")]).unwrap(), m(393_216, 1_074_135_040));
        assert_eq!(sized(1 << 30, &[("cluster_size", "512")]).unwrap(), m(21_385_216, 1_095_127_040));
        // compat 0.10 with extended L2 is not refused by measure.
        assert_eq!(sized(1 << 30, &[("compat", "0.10"), ("extended_l2", "on")]).unwrap(), m(524_288, 1_074_266_112));
        let raw = MeasureOptions::default();
        assert_eq!(measure_image(Some(1000), None, &raw).unwrap(), m(1024, 1024));
        assert_eq!(measure_image(Some(i64::MAX as u64), None, &raw).unwrap(), m(1 << 63, 1 << 63));
    }

    #[test]
    fn options_are_checked_in_qemus_order() {
        let err = |opts: &[(&str, &str)]| sized(1 << 30, opts).unwrap_err().to_string();
        assert!(err(&[("cluster_size", "1000"), ("compat", "0.9")]).starts_with("Cluster size must"));
        assert!(err(&[("compat", "0.9"), ("refcount_bits", "3")]).starts_with("Invalid compatibility level: '0.9'"));
        assert!(err(&[("compat", "v3")]).starts_with("Invalid compatibility level: 'v3'"));
        assert!(err(&[("refcount_bits", "3"), ("preallocation", "bad")]).starts_with("Refcount width"));
        assert!(err(&[("refcount_bits", "0")]).starts_with("Refcount width"));
        assert!(err(&[("compat", "0.10"), ("refcount_bits", "8")]).starts_with("Different refcount widths"));
        assert_eq!(err(&[("preallocation", "bad")]), "invalid parameter value: bad");
        assert!(err(&[("extended_l2", "on"), ("cluster_size", "4096")]).starts_with("Extended L2 entries"));
        assert!(sized(1 << 50, &[("cluster_size", "512")])
            .unwrap_err()
            .to_string()
            .starts_with("The image size is too large"));
    }

    #[test]
    fn a_source_counts_its_data_clusters_once() {
        let opts = CreateOptions { virtual_size: 1 << 30, ..CreateOptions::default() };
        let mut f = create_on(Arc::new(MemStorage::default()), &opts).unwrap();
        f.write_at(&[1u8; 512], 512).unwrap();
        f.write_at(&[1u8; 65536], 65536).unwrap();
        f.write_at(&[1u8; 64512], 128 << 20).unwrap();
        f.write_zeroes(256 << 20, 1 << 20).unwrap();
        f.flush().unwrap();
        let got = measure_image(None, Some(&f), &qcow2(&[])).unwrap();
        // qemu-iotests 178: required 589824 (three data clusters), no bitmaps: 0.
        assert_eq!(got, Measurement { required: 589_824, fully_allocated: 1_074_135_040, bitmaps: Some(0) });
        // 512-byte target clusters: the source's block status is by its own (64 KiB)
        // clusters, each holding data as a whole.
        let small = measure_image(None, Some(&f), &qcow2(&[("cluster_size", "512")])).unwrap();
        let meta = small.fully_allocated - (1 << 30);
        assert_eq!(small.required - meta, 3 * 65536);
        // A backing file option counts everything; so does full preallocation.
        let b = measure_image(None, Some(&f), &qcow2(&[("backing_file", "x")])).unwrap();
        assert_eq!(b.required, b.fully_allocated);
        // The size option is checked (rounded up in 64 bits as QEMU does: 2^64 - 1 wraps to
        // 0 and passes), the source's size measured.
        let mut o = qcow2(&[]);
        o.size = Some(u64::MAX);
        assert_eq!(measure_image(None, Some(&f), &o).unwrap(), got);
        o.size = Some(1 << 50);
        o.cluster_size = 512;
        assert!(measure_image(None, Some(&f), &o).is_err());
        // A v2 target has no bitmaps line.
        let v2 = measure_image(None, Some(&f), &qcow2(&[("compat", "0.10")])).unwrap();
        assert_eq!(v2.bitmaps, None);
        // Raw: the length.
        let raw = measure_image(None, Some(&f), &MeasureOptions::default()).unwrap();
        assert_eq!(raw, m(1 << 30, 1 << 30));
    }

    #[test]
    fn clusters_are_counted_once_across_runs() {
        assert_eq!(count_clusters(&[(0, 512), (1024, 2048), (4096, 65536 + 1)], 65536), 2);
        assert_eq!(count_clusters(&[(512, 1024), (70000, 70001)], 65536), 2);
        assert_eq!(count_clusters(&[(0, 0)], 512), 0);
        assert_eq!(count_clusters(&[(100, 600), (600, 1025)], 512), 3);
    }
}
