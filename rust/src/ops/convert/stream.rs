//! `convert ... -`: the target written to a pipe, front to back, never seeking.
//!
//! Raw: the guest bytes in order (zero runs as zeros). qcow2: the metadata goes first, so its
//! content must be known before any data: a first pass over the sources (the same workers, the
//! same zero detection) records which target clusters hold data and which are explicit zero
//! clusters; the layout is then header, refcount table, refcount blocks, L1 table, the L2
//! tables in guest order and the data clusters in guest order, every cluster with refcount 1.
//! The second pass reads the data again and writes it where the layout put it; a source that
//! changed between the passes (it is locked, so only a `-U` source can) is an error, not a
//! wrong image. Compressed clusters (whose sizes only the compression tells) are not
//! streamed.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::header::QcowHeader;
use crate::raw_file::QcowRawFile;
use crate::storage::MemStorage;

/// L2 entry flag: refcount exactly 1.
const OFLAG_COPIED: u64 = 1 << 63;
/// Standard L2 entry: reads as zeros.
const OFLAG_ZERO: u64 = 1;

/// What the first pass found: guest clusters with data, and explicit zero clusters.
#[derive(Debug, Default)]
pub(super) struct Record {
    pub(super) data: Vec<u64>,
    pub(super) zero: Vec<u64>,
}

impl Record {
    pub(super) fn add(list: &mut Vec<u64>, off: u64, len: u64, cluster_bits: u32) {
        if len == 0 {
            return;
        }
        let (first, last) = (off >> cluster_bits, (off + len - 1) >> cluster_bits);
        for c in first..=last {
            if list.last() != Some(&c) {
                list.push(c);
            }
        }
    }
}

/// The stream's metadata, ready to be written before the data.
pub(super) struct Layout {
    /// Every metadata cluster, header first.
    pub(super) meta: Vec<u8>,
}

fn clusters_for(bytes: u64, cs: u64) -> u64 {
    bytes.div_ceil(cs)
}

/// Lays out the image: `h` is the header of a new empty image with the target's options.
pub(super) fn layout(mut h: QcowHeader, rec: &Record) -> Result<Layout> {
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let l1_size = u64::from(h.l1_size);
    let tables: BTreeSet<u64> = rec.data.iter().chain(&rec.zero).map(|c| c / l2e).collect();
    let l1c = clusters_for(l1_size * 8, cs).max(1);
    let l2n = tables.len() as u64;
    let n = rec.data.len() as u64;
    let per_block = (cs * 8) >> h.refcount_order;
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1c + l2n + n;
        let rb2 = total.div_ceil(per_block);
        let rt2 = clusters_for(rb2 * 8, cs);
        if (rb2, rt2) == (rb, rt) {
            break;
        }
        (rb, rt) = (rb2, rt2);
    }
    let total = 1 + rt + rb + l1c + l2n + n;
    let (rt_off, rb_off) = (cs, cs * (1 + rt));
    let l1_off = rb_off + rb * cs;
    let l2_off = l1_off + l1c * cs;
    let data_off = l2_off + l2n * cs;
    let meta_len = usize::try_from(data_off).map_err(|_| Error::InvalidArgument("stream metadata too large".into()))?;
    let mem = Arc::new(MemStorage::new(vec![0u8; meta_len]));
    let raw = QcowRawFile::new(mem.clone(), cs, h.refcount_order, true)?;
    let reftable: Vec<u64> = (0..rb).map(|i| rb_off + i * cs).collect();
    raw.write_u64_table(rt_off, &reftable, "refcount table")?;
    for i in 0..rb {
        let from = i * per_block;
        let count = total.saturating_sub(from).min(per_block);
        raw.write_refcount_block(rb_off + i * cs, &vec![1u64; usize::try_from(count).unwrap_or(0)])?;
    }
    let mut l1 = vec![0u64; usize::try_from(l1_size).unwrap_or(0)];
    let mut table_of = std::collections::HashMap::new();
    for (k, &t) in tables.iter().enumerate() {
        let off = l2_off + k as u64 * cs;
        l1[usize::try_from(t).unwrap_or(0)] = off | OFLAG_COPIED;
        table_of.insert(t, off);
    }
    raw.write_u64_table(l1_off, &l1, "L1 table")?;
    write_l2_entries(&raw, &h, rec, &table_of, data_off)?;
    h.l1_table_offset = l1_off;
    h.refcount_table_offset = rt_off;
    h.refcount_table_clusters =
        u32::try_from(rt).map_err(|_| Error::InvalidArgument("refcount table too large".into()))?;
    let bytes = h.to_bytes()?;
    raw.write_at(&bytes, 0, "header")?;
    Ok(Layout { meta: mem.to_vec() })
}

fn write_l2_entries(
    raw: &QcowRawFile,
    h: &QcowHeader,
    rec: &Record,
    table_of: &std::collections::HashMap<u64, u64>,
    data_off: u64,
) -> Result<()> {
    let cs = h.cluster_size();
    let l2e = h.l2_entries();
    let words = if h.extended_l2() { 2 } else { 1 };
    // Each table built whole in memory, then written once.
    let mut tables: std::collections::BTreeMap<u64, (u64, Vec<u64>)> =
        table_of.iter().map(|(&t, &offset)| (t, (offset, vec![0u64; usize::try_from(cs / 8).unwrap_or(0)]))).collect();
    let mut put = |c: u64, entry: u64, bitmap: u64| {
        if let Some((_, t)) = tables.get_mut(&(c / l2e)) {
            let at = usize::try_from((c % l2e) * words).unwrap_or(0);
            t[at] = entry;
            if words == 2 {
                t[at + 1] = bitmap;
            }
        }
    };
    for (k, &c) in rec.data.iter().enumerate() {
        put(c, (data_off + k as u64 * cs) | OFLAG_COPIED, 0x0000_0000_ffff_ffff);
    }
    for &c in &rec.zero {
        if h.extended_l2() {
            put(c, 0, 0xffff_ffff_0000_0000);
        } else {
            put(c, OFLAG_ZERO, 0);
        }
    }
    for (offset, words) in tables.values() {
        raw.write_u64_table(*offset, words, "L2 table")?;
    }
    Ok(())
}

/// The second pass's writer: the metadata, then each data cluster in guest order.
pub(super) struct Stream {
    pub(super) out: std::fs::File,
    pub(super) data: Vec<u64>,
    pub(super) next: usize,
    pub(super) cluster_bits: u32,
    pub(super) raw_size: Option<u64>,
    pub(super) pos: u64,
}

impl Stream {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).ctx(|| "writing to the output stream".to_string())?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Writes `bytes` for the guest range at `off` (whole clusters; the disk's last one may be
    /// short and is padded).
    pub(super) fn data(&mut self, off: u64, bytes: &[u8]) -> Result<()> {
        if self.raw_size.is_some() {
            self.zeros_to(off)?;
            return self.put(bytes);
        }
        let cs = 1usize << self.cluster_bits;
        for (i, chunk) in bytes.chunks(cs).enumerate() {
            let c = (off >> self.cluster_bits) + i as u64;
            if self.data.get(self.next) != Some(&c) {
                return Err(Error::InvalidArgument(format!(
                    "the source changed while it was streamed (guest cluster {c} was not data in the first pass)"
                )));
            }
            self.next += 1;
            self.put(chunk)?;
            if chunk.len() < cs {
                self.put(&vec![0u8; cs - chunk.len()])?;
            }
        }
        Ok(())
    }

    /// Writes the metadata (before any data).
    pub(super) fn data_meta(&mut self, meta: &[u8]) -> Result<()> {
        self.put(meta)
    }

    /// Raw streams: zeros up to `off`.
    pub(super) fn zeros_to(&mut self, off: u64) -> Result<()> {
        let zeros = vec![0u8; 1 << 20];
        while self.pos < off {
            let n = usize::try_from((off - self.pos).min(1 << 20)).unwrap_or(0);
            self.put(&zeros[..n])?;
        }
        Ok(())
    }

    pub(super) fn finish(mut self) -> Result<()> {
        if let Some(size) = self.raw_size {
            self.zeros_to(size)?;
        } else if self.next != self.data.len() {
            return Err(Error::InvalidArgument(format!(
                "the source changed while it was streamed ({} of {} data clusters found again)",
                self.next,
                self.data.len()
            )));
        }
        self.out.flush().ctx(|| "writing to the output stream".to_string())
    }
}
