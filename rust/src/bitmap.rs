//! Persistent dirty bitmaps kept up to date by writes, with QEMU's protocol: every enabled
//! ("auto") bitmap is flagged in_use before the first write reaches the image; the written
//! ranges are set in the bitmaps and the flag cleared only on a clean close. A crash leaves the
//! bitmaps in_use, which QEMU treats as inconsistent, so no incremental backup trusts a bitmap
//! that may miss a write.

use crate::error::{Error, Result};
use crate::format::{be_u16_at, be_u32_at, be_u64_at, L2E_OFFSET_MASK};
use crate::header::QcowHeader;
use crate::raw_file::QcowRawFile;

/// One bitmap of the bitmap directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Offset of this directory entry in the host file.
    pub entry_offset: u64,
    /// Flags (bit 0 in_use, bit 1 auto).
    pub flags: u32,
    /// The bitmap table.
    pub bitmap_table_offset: u64,
    /// Entries in the bitmap table.
    pub bitmap_table_size: u32,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Name.
    pub name: String,
    /// Bytes of the name as QEMU counts them (`strlen`: up to a NUL byte, whatever the
    /// encoding).
    pub name_len: usize,
    /// The name's bytes as stored (kept verbatim when the directory is rewritten).
    pub name_bytes: Vec<u8>,
    /// The bitmap type (1: dirty tracking, the only one defined).
    pub bitmap_type: u8,
    /// Extra data (kept verbatim when the directory is rewritten).
    pub extra_data: Vec<u8>,
}

/// Reads the bitmap directory (bounded by the extension's size, itself checked against the file).
pub fn read_bitmap_directory(raw: &QcowRawFile, h: &QcowHeader) -> Result<Vec<BitmapEntry>> {
    let Some(ext) = h.bitmaps() else { return Ok(Vec::new()) };
    let size = ext.bitmap_directory_size.min(raw.file_len());
    let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
    raw.read_table_bytes(ext.bitmap_directory_offset, &mut buf, "bitmap_directory_offset (bitmap directory)")?;
    let mut out = Vec::new();
    let mut off = 0usize;
    for i in 0..ext.nb_bitmaps {
        if off + 24 > buf.len() {
            return Err(Error::corrupt(
                format!("bitmap directory entry {i} runs past the directory's size 0x{size:x}"),
                ext.bitmap_directory_offset,
            ));
        }
        let e = &buf[off..];
        let bitmap_table_offset = be_u64_at(e, 0);
        let bitmap_table_size = be_u32_at(e, 8);
        let name_size = usize::from(be_u16_at(e, 18));
        let extra = be_u32_at(e, 20) as usize;
        let end = 24 + extra + name_size;
        if off + end > buf.len() {
            return Err(Error::corrupt(
                format!("bitmap directory entry {i} runs past the directory's size 0x{size:x}"),
                ext.bitmap_directory_offset + off as u64,
            ));
        }
        let name_bytes = &e[24 + extra..end];
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let name_len = name_bytes.iter().position(|&b| b == 0).unwrap_or(name_bytes.len());
        let flags = be_u32_at(e, 12);
        out.push(BitmapEntry {
            entry_offset: ext.bitmap_directory_offset + off as u64,
            flags,
            bitmap_table_offset,
            bitmap_table_size,
            granularity_bits: e[17],
            name,
            name_len,
            name_bytes: name_bytes.to_vec(),
            bitmap_type: e[16],
            extra_data: e[24..24 + extra].to_vec(),
        });
        off += end.div_ceil(8) * 8;
    }
    Ok(out)
}

/// The directory as bytes: each entry (table offset and size, flags, type, granularity, the
/// name's and extra data's sizes, the extra data, the name) padded to 8 bytes.
pub(crate) fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in entries {
        out.extend_from_slice(&b.bitmap_table_offset.to_be_bytes());
        out.extend_from_slice(&b.bitmap_table_size.to_be_bytes());
        out.extend_from_slice(&b.flags.to_be_bytes());
        out.push(b.bitmap_type);
        out.push(b.granularity_bits);
        out.extend_from_slice(&u16::try_from(b.name_bytes.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&u32::try_from(b.extra_data.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&b.extra_data);
        out.extend_from_slice(&b.name_bytes);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out
}

/// Bytes of the directory entry of a bitmap named with `name_len` bytes and no extra data
/// (QEMU's `calc_dir_entry_size`).
pub(crate) fn dir_entry_size(name_len: usize) -> u64 {
    (24 + name_len as u64).div_ceil(8) * 8
}

/// Entries of the bitmap table of a bitmap with 2^`granularity_bits`-byte granularity on a
/// disk of `disk_size` bytes with `cluster_size`-byte clusters: one per cluster of bits.
pub(crate) fn table_entries_needed(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    let bits = disk_size.div_ceil(1u64 << u32::from(granularity_bits).min(63));
    bits.div_ceil(cluster_size * 8)
}

/// Why an entry cannot be read as a bitmap (QEMU's `check_dir_entry`), if it cannot.
pub(crate) fn entry_defect(h: &QcowHeader, b: &BitmapEntry) -> Option<String> {
    let cs = h.cluster_size();
    let why = if b.bitmap_type != 1 {
        format!("type {} is not a dirty tracking bitmap", b.bitmap_type)
    } else if !(9..=31).contains(&b.granularity_bits) {
        format!("granularity 2^{} is outside 2^9..2^31", b.granularity_bits)
    } else if b.bitmap_table_offset == 0 || b.bitmap_table_offset % cs != 0 {
        format!("bitmap table offset 0x{:x} is not a cluster offset", b.bitmap_table_offset)
    } else if b.flags & !7 != 0 {
        format!("reserved flags 0x{:x} are set", b.flags & !7)
    } else if u64::from(b.bitmap_table_size) != table_entries_needed(h.size, b.granularity_bits, cs) {
        format!(
            "the table has {} entries; the disk needs {}",
            b.bitmap_table_size,
            table_entries_needed(h.size, b.granularity_bits, cs)
        )
    } else {
        return None;
    };
    Some(format!("bitmap '{}' (directory entry at 0x{:x}): {why}", b.name, b.entry_offset))
}

/// Reads the bitmap table of `b` (its entries checked: data offsets cluster aligned, inside
/// the file).
pub(crate) fn read_bitmap_table(raw: &QcowRawFile, b: &BitmapEntry) -> Result<Vec<u64>> {
    let what = format!("bitmap table of '{}'", b.name);
    let table = raw.read_u64_table(b.bitmap_table_offset, u64::from(b.bitmap_table_size), &what)?;
    let cs = raw.cluster_size();
    for (i, &e) in table.iter().enumerate() {
        let off = e & L2E_OFFSET_MASK;
        let bad_flags = e & !L2E_OFFSET_MASK & !1 != 0 || (off != 0 && e & 1 != 0);
        if bad_flags || off % cs != 0 || off.checked_add(cs).is_none_or(|end| end > raw.file_len()) {
            return Err(Error::corrupt(
                format!("bitmap table of '{}': entry {i} (0x{e:x}) is not a valid data cluster", b.name),
                b.bitmap_table_offset + 8 * i as u64,
            ));
        }
    }
    Ok(table)
}

/// What one bitmap table entry holds: a cluster of bits (LSB first in each byte).
pub(crate) enum BitmapCluster {
    /// Every bit clear (no data cluster).
    Zeros,
    /// Every bit set (no data cluster).
    Ones,
    /// The bits in the data cluster at this host offset.
    Data(u64),
}

impl BitmapCluster {
    /// Classifies a bitmap table entry.
    pub(crate) fn of(entry: u64) -> Self {
        match entry & L2E_OFFSET_MASK {
            0 if entry & 1 != 0 => BitmapCluster::Ones,
            0 => BitmapCluster::Zeros,
            off => BitmapCluster::Data(off),
        }
    }

    /// The cluster's bytes (`cs` of them).
    pub(crate) fn bytes(&self, raw: &QcowRawFile, name: &str) -> Result<Vec<u8>> {
        let cs = usize::try_from(raw.cluster_size()).unwrap_or(0);
        Ok(match self {
            BitmapCluster::Zeros => vec![0; cs],
            BitmapCluster::Ones => vec![0xff; cs],
            BitmapCluster::Data(off) => {
                let mut buf = vec![0u8; cs];
                raw.read_table_bytes(*off, &mut buf, &format!("bitmap '{name}' data"))?;
                buf
            }
        })
    }
}

/// Appends the runs of set bits of `bytes` (bit `first_bit + i` is bit i, LSB first) as guest
/// ranges of 2^`g` bytes per bit, cut at `disk_size`, merged with the previous range.
pub(crate) fn push_bit_ranges(out: &mut Vec<(u64, u64)>, bytes: &[u8], first_bit: u64, g: u32, disk_size: u64) {
    let mut push = |start_bit: u64, end_bit: u64| {
        let start = start_bit << g;
        if start >= disk_size {
            return;
        }
        let end = (end_bit << g).min(disk_size);
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += end - start,
            _ => out.push((start, end - start)),
        }
    };
    let mut run: Option<u64> = None;
    for (i, &byte) in bytes.iter().enumerate() {
        let base = first_bit + 8 * i as u64;
        match (byte, run) {
            (0xff, _) => run = run.or(Some(base)),
            (0, Some(s)) => {
                push(s, base);
                run = None;
            }
            (0, None) => {}
            _ => {
                for k in 0..8 {
                    let set = byte & (1 << k) != 0;
                    match (set, run) {
                        (true, None) => run = Some(base + k),
                        (false, Some(s)) => {
                            push(s, base + k);
                            run = None;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    if let Some(s) = run {
        push(s, first_bit + 8 * bytes.len() as u64);
    }
}

/// The guest ranges `b` marks dirty, in order, adjacent ones merged.
pub(crate) fn read_dirty_ranges(raw: &QcowRawFile, h: &QcowHeader, b: &BitmapEntry) -> Result<Vec<(u64, u64)>> {
    let table = read_bitmap_table(raw, b)?;
    let g = u32::from(b.granularity_bits);
    let bits_per_cluster = raw.cluster_size() * 8;
    let mut out = Vec::new();
    for (t, &e) in table.iter().enumerate() {
        let c = BitmapCluster::of(e);
        if matches!(c, BitmapCluster::Zeros) {
            continue;
        }
        push_bit_ranges(&mut out, &c.bytes(raw, &b.name)?, t as u64 * bits_per_cluster, g, h.size);
    }
    Ok(out)
}

/// One persistent bitmap as `f.bitmaps()` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// Name.
    pub name: String,
    /// Bytes of guest disk one bit covers.
    pub granularity: u64,
    /// Tracks writes (the "auto" flag).
    pub enabled: bool,
    /// Flagged in use on disk by a writer that did not close: inconsistent, not to be trusted.
    pub in_use: bool,
    /// Stored in the image (always, for bitmaps read from it).
    pub persistent: bool,
}

/// Sets the bits covering the guest range `[start, end)` in the clusters of a bitmap with
/// 2^`g`-byte granularity, kept in `bufs` by table index; a cluster not there yet is loaded
/// by `load(t)` (None: past the table).
pub(crate) fn set_range_bits(
    bufs: &mut std::collections::BTreeMap<u64, Vec<u8>>,
    (start, end): (u64, u64),
    g: u32,
    bits_per_cluster: u64,
    load: &mut dyn FnMut(u64) -> Result<Option<Vec<u8>>>,
) -> Result<()> {
    if end <= start {
        return Ok(());
    }
    let (first, last) = (start >> g, (end - 1) >> g);
    for t in first / bits_per_cluster..=last / bits_per_cluster {
        let buf = match bufs.entry(t) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let Some(b) = load(t)? else { break };
                v.insert(b)
            }
        };
        let base = t * bits_per_cluster;
        set_bits(buf, first.max(base) - base, last.min(base + bits_per_cluster - 1) - base);
    }
    Ok(())
}

/// Bitmap flag: in use (may be inconsistent).
pub(crate) const FLAG_IN_USE: u32 = 1;
/// Bitmap flag: enabled, tracks every write.
pub(crate) const FLAG_AUTO: u32 = 2;
/// Dirty ranges kept before they are merged.
const MERGE_AT: usize = 4096;

/// What the first write does about persistent bitmaps.
pub(crate) enum BitmapStart {
    /// No enabled bitmap to keep.
    Nothing,
    /// Track these bitmaps (they are flagged in use).
    Track(BitmapTracker),
    /// The bitmaps cannot be updated without writing into clusters something else uses (or
    /// they are malformed): the writer clears the autoclear bit instead, which tells QEMU that
    /// no bitmap of the image can be trusted. Never a guest byte is touched.
    Unsafe,
}

/// Why updating `bitmaps` in place could change something else, if it could: each bitmap's
/// granularity and table size must be sane, and the directory, the tables and the data
/// clusters must each have refcount 1 (nothing else points at them).
fn unsafe_to_update(raw: &QcowRawFile, h: &QcowHeader, bitmaps: &[BitmapEntry]) -> Result<Option<String>> {
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let mut view = crate::refcount::RefcountView::load(raw, h);
    let mut private = |offset: u64, len: u64| -> bool {
        if offset % cs != 0 || len == 0 {
            return false;
        }
        let Some(end) = offset.checked_add(len) else { return false };
        // A structure reaching past the end of the file is not one to update in place (and
        // its clusters are not walked one by one: the range is the image's to claim).
        if end > raw.file_len() {
            return false;
        }
        ((offset >> cb)..=((end - 1) >> cb)).all(|c| view.get(raw, c) == Ok(1))
    };
    let Some(ext) = h.bitmaps() else { return Ok(Some("no bitmaps extension".into())) };
    if !private(ext.bitmap_directory_offset, ext.bitmap_directory_size) {
        return Ok(Some("the bitmap directory shares its clusters".into()));
    }
    for b in bitmaps {
        let g = u32::from(b.granularity_bits);
        if !(9..=31).contains(&g) {
            return Ok(Some(format!("bitmap '{}' has granularity 2^{g}, outside QEMU's 2^9..2^31", b.name)));
        }
        // One table entry per cluster of bitmap data; one bit per 2^g guest bytes.
        let bits = h.size.div_ceil(1 << g);
        let expected = bits.div_ceil(cs * 8);
        if u64::from(b.bitmap_table_size) != expected {
            return Ok(Some(format!(
                "bitmap '{}' has {} table entries; the disk needs {expected}",
                b.name, b.bitmap_table_size
            )));
        }
        let bytes = u64::from(b.bitmap_table_size) * 8;
        if !private(b.bitmap_table_offset, bytes) {
            return Ok(Some(format!("the table of bitmap '{}' shares its clusters", b.name)));
        }
        let table = raw.read_u64_table(b.bitmap_table_offset, u64::from(b.bitmap_table_size), "bitmap table")?;
        for e in table {
            let off = e & L2E_OFFSET_MASK;
            if off != 0 && !private(off, cs) {
                return Ok(Some(format!("a data cluster of bitmap '{}' (0x{off:x}) is shared", b.name)));
            }
        }
    }
    Ok(None)
}

/// Hands out clusters for bitmap data and makes them durable (the writer's allocator).
pub(crate) trait ClusterAllocator {
    /// A fresh cluster (refcount 1); its host offset.
    fn alloc_cluster(&mut self) -> Result<u64>;
    /// The new clusters' refcounts and data durable, before any table points at them.
    fn make_durable(&mut self) -> Result<()>;
}

/// The enabled bitmaps of an image being written, and the guest ranges written so far.
pub struct BitmapTracker {
    bitmaps: Vec<BitmapEntry>,
    dirty: Vec<(u64, u64)>,
}

fn merge(ranges: &mut Vec<(u64, u64)>) {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(s, e) in ranges.iter() {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    *ranges = out;
}

/// Sets bits `lo..=hi` (LSB first in each byte) of `buf`.
fn set_bits(buf: &mut [u8], lo: u64, hi: u64) {
    let mut i = lo;
    while i <= hi {
        let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
        if i % 8 == 0 && hi - i >= 7 {
            let full_bytes = usize::try_from((hi - i + 1) / 8).unwrap_or(0);
            let end = (byte + full_bytes).min(buf.len());
            if let Some(s) = buf.get_mut(byte..end) {
                s.fill(0xff);
            }
            i += 8 * full_bytes as u64;
            continue;
        }
        if let Some(b) = buf.get_mut(byte) {
            *b |= 1 << (i % 8);
        }
        i += 1;
    }
}

impl BitmapTracker {
    /// Flags every enabled bitmap in_use (synced) and starts tracking; `None` when the image has
    /// no bitmap to keep.
    pub fn start(raw: &QcowRawFile, h: &QcowHeader) -> Result<BitmapStart> {
        if h.autoclear_features & crate::format::AUTOCLEAR_BITMAPS == 0 {
            return Ok(BitmapStart::Nothing);
        }
        let dir = match read_bitmap_directory(raw, h) {
            Ok(d) => d,
            Err(_) => return Ok(BitmapStart::Unsafe),
        };
        // A bitmap already in use is inconsistent and stays so; a disabled one does not change.
        let bitmaps: Vec<BitmapEntry> =
            dir.into_iter().filter(|b| b.flags & FLAG_AUTO != 0 && b.flags & FLAG_IN_USE == 0).collect();
        if bitmaps.is_empty() {
            return Ok(BitmapStart::Nothing);
        }
        if unsafe_to_update(raw, h, &bitmaps)?.is_some() {
            return Ok(BitmapStart::Unsafe);
        }
        for b in &bitmaps {
            raw.write_at(
                &(b.flags | FLAG_IN_USE).to_be_bytes(),
                b.entry_offset + 12,
                "bitmap directory entry (in_use)",
            )?;
        }
        raw.sync()?;
        Ok(BitmapStart::Track(BitmapTracker { bitmaps, dirty: Vec::new() }))
    }

    /// Whether this tracker keeps the bitmap named `name` (flagged in use by this writer).
    pub(crate) fn tracks(&self, name: &str) -> bool {
        self.bitmaps.iter().any(|b| b.name == name)
    }

    /// The guest ranges written so far (`(start, end)`, not yet in the bitmaps on disk).
    pub(crate) fn pending(&self) -> Vec<(u64, u64)> {
        let mut d = self.dirty.clone();
        merge(&mut d);
        d
    }

    /// Records that `[offset, offset+len)` of the guest changed.
    pub fn note(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.dirty.push((offset, offset.saturating_add(len)));
        if self.dirty.len() >= MERGE_AT {
            merge(&mut self.dirty);
        }
    }

    /// Sets the recorded ranges in every tracked bitmap, then clears their in_use flags.
    /// New bitmap clusters come from `alloc`, and are durable before the tables point at them.
    pub(crate) fn finish(mut self, raw: &QcowRawFile, alloc: &mut dyn ClusterAllocator) -> Result<()> {
        merge(&mut self.dirty);
        let cs = raw.cluster_size();
        let bits_per_cluster = cs * 8;
        for b in &self.bitmaps {
            let g = u32::from(b.granularity_bits).min(63);
            let table_bytes = u64::from(b.bitmap_table_size) * 8;
            if b.bitmap_table_offset.checked_add(table_bytes).is_none_or(|end| end > raw.file_len()) {
                return Err(Error::offset(
                    format!("bitmap table of '{}'", b.name),
                    b.bitmap_table_offset,
                    format!("(0x{table_bytes:x} bytes) lies past the end of the file"),
                ));
            }
            let what = format!("bitmap table of '{}'", b.name);
            let mut table = raw.read_u64_table(b.bitmap_table_offset, u64::from(b.bitmap_table_size), &what)?;
            let mut touched: std::collections::BTreeMap<u64, Vec<u8>> = std::collections::BTreeMap::new();
            for &(s, e) in &self.dirty {
                let (first, last) = (s >> g, (e - 1) >> g);
                for t in first / bits_per_cluster..=last / bits_per_cluster {
                    let Some(&entry) = usize::try_from(t).ok().and_then(|i| table.get(i)) else { break };
                    let off = entry & L2E_OFFSET_MASK;
                    if off == 0 && entry & 1 != 0 {
                        continue; // all ones already
                    }
                    let buf = match touched.entry(t) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(v) => {
                            let mut buf = vec![0u8; usize::try_from(cs).unwrap_or(0)];
                            if off != 0 {
                                raw.read_table_bytes(off, &mut buf, &format!("bitmap '{}' data", b.name))?;
                            }
                            v.insert(buf)
                        }
                    };
                    let base = t * bits_per_cluster;
                    set_bits(buf, first.max(base) - base, last.min(base + bits_per_cluster - 1) - base);
                }
            }
            let mut table_changed = false;
            for (t, buf) in &touched {
                let i = usize::try_from(*t).map_err(|_| Error::corrupt("bitmap table index", b.bitmap_table_offset))?;
                let off = table[i] & L2E_OFFSET_MASK;
                if off != 0 {
                    raw.write_at(buf, off, "bitmap data")?;
                } else {
                    let c = alloc.alloc_cluster()?;
                    raw.write_at(buf, c, "bitmap data")?;
                    table[i] = c;
                    table_changed = true;
                }
            }
            alloc.make_durable()?;
            if table_changed {
                raw.write_pointer_table(b.bitmap_table_offset, &table, 0)?;
                raw.sync()?;
            }
        }
        for b in &self.bitmaps {
            raw.write_at(&b.flags.to_be_bytes(), b.entry_offset + 12, "bitmap directory entry (in_use cleared)")?;
        }
        raw.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_lsb_first_and_ranges_inclusive() {
        let mut b = vec![0u8; 4];
        set_bits(&mut b, 3, 17);
        assert_eq!(b, vec![0b1111_1000, 0xff, 0b0000_0011, 0]);
        let mut r = vec![(10, 20), (0, 5), (15, 30), (31, 40)];
        merge(&mut r);
        assert_eq!(r, vec![(0, 5), (10, 30), (31, 40)]);
    }

    #[test]
    fn bit_runs_become_guest_ranges_cut_at_the_disk_end() {
        let mut out = Vec::new();
        // Bits 1..=2 and 8..=23 and the last bit of a 4-byte cluster, 512-byte granularity.
        push_bit_ranges(&mut out, &[0b0000_0110, 0xff, 0xff, 0x80], 0, 9, 31 * 512 + 100);
        assert_eq!(out, vec![(512, 1024), (8 * 512, 16 * 512), (31 * 512, 100)]);
        // The next cluster's first bit continues the run.
        let mut out = vec![(0, 512)];
        push_bit_ranges(&mut out, &[1], 1, 9, 1 << 20);
        assert_eq!(out, vec![(0, 1024)]);
    }
}
