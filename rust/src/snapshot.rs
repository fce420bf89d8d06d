//! The snapshot table: its entries with every field, read with QEMU's limits and QEMU's view of
//! a table that runs past the end of the file (the missing bytes read as zeros), and written
//! back (for a repair, and for snapshot operations).

use crate::error::{Error, Result};
use crate::format::{be_u16_at, be_u32_at, be_u64_at, MAX_SNAPSHOTS};
use crate::header::{field_offset, QcowHeader};
use crate::raw_file::QcowRawFile;

/// QEMU's limit on a snapshot's extra data.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// QEMU's limit on the snapshot table size.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;

/// One internal snapshot, every field of its table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of this entry in the host file.
    pub entry_offset: u64,
    /// The snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time: seconds since the epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest (VM) clock at the snapshot, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state (32-bit field).
    pub vm_state_size: u32,
    /// Bytes of extra data.
    pub extra_data_size: u32,
    /// The extra data as stored (at most 1024 bytes).
    pub extra: Vec<u8>,
}

impl Snapshot {
    /// The entry as stored, padded to 8 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut e = Vec::with_capacity(40 + self.extra.len() + self.id.len() + self.name.len() + 8);
        e.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        e.extend_from_slice(&self.l1_size.to_be_bytes());
        // Ids and names are bounded to u16 lengths when read or made.
        e.extend_from_slice(&u16::try_from(self.id.len()).unwrap_or(u16::MAX).to_be_bytes());
        e.extend_from_slice(&u16::try_from(self.name.len()).unwrap_or(u16::MAX).to_be_bytes());
        e.extend_from_slice(&self.date_sec.to_be_bytes());
        e.extend_from_slice(&self.date_nsec.to_be_bytes());
        e.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        e.extend_from_slice(&self.vm_state_size.to_be_bytes());
        e.extend_from_slice(&u32::try_from(self.extra.len()).unwrap_or(0).to_be_bytes());
        e.extend_from_slice(&self.extra);
        e.extend_from_slice(self.id.as_bytes());
        e.extend_from_slice(self.name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }
}

/// The snapshot table: its entries and its total size in bytes.
#[derive(Clone, Debug, Default)]
pub struct SnapshotTable {
    /// The entries.
    pub snapshots: Vec<Snapshot>,
    /// Bytes the table occupies (QEMU's `snapshots_size`).
    pub size: u64,
}

impl SnapshotTable {
    /// The table as stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.snapshots.iter().flat_map(Snapshot::to_bytes).collect()
    }
}

/// The table's bytes as QEMU sees them: what the file holds, then zeros (QEMU's file layer
/// pads reads past the end of the file). Read as far as the entries need, in growing chunks,
/// never past the file or QEMU's 64 MiB table limit.
struct TableBytes<'a> {
    raw: &'a QcowRawFile,
    start: u64,
    /// Bytes of the table the file holds (at most 64 MiB).
    avail: usize,
    buf: Vec<u8>,
}

impl TableBytes<'_> {
    fn get(&mut self, off: usize, len: usize) -> Result<Vec<u8>> {
        let want = off.saturating_add(len).min(self.avail);
        if want > self.buf.len() {
            let upto = want.max(self.buf.len().saturating_mul(2)).max(64 << 10).min(self.avail);
            let from = self.buf.len();
            self.buf.resize(upto, 0);
            let n = self.raw.read_at(&mut self.buf[from..], self.start + from as u64)?;
            if from + n < upto {
                // The file ended early (it shrank since its length was taken).
                self.buf.truncate(from + n);
                self.avail = self.buf.len();
            }
        }
        let mut v = vec![0u8; len];
        if off < self.buf.len() {
            let n = len.min(self.buf.len() - off);
            v[..n].copy_from_slice(&self.buf[off..off + n]);
        }
        Ok(v)
    }
}

/// Why the entries after some point could not be read.
#[derive(Clone, Debug)]
pub struct TableDamage {
    /// Index of the first entry that could not be read.
    pub index: u32,
    /// Its offset in the file.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

/// Reads the snapshot table named by the header with QEMU's rules: at most 65536 entries, at
/// most 1024 bytes of extra data each, at most 64 MiB in all; bytes past the end of the file
/// read as zeros. Returns the entries read and, if it stopped early, why. With `repairing`, as
/// QEMU's `check -r all`: only the first 65536 entries are read, and extra data beyond 1024
/// bytes is cut off instead of stopping the read.
pub fn read_snapshot_table_lenient(
    raw: &QcowRawFile,
    h: &QcowHeader,
    repairing: bool,
) -> (SnapshotTable, Option<TableDamage>) {
    let mut table = SnapshotTable::default();
    if h.nb_snapshots == 0 {
        return (table, None);
    }
    let start = h.snapshots_offset;
    let damage =
        |index: u32, off: u64, reason: String| Some(TableDamage { index, offset: start.saturating_add(off), reason });
    let mut count = h.nb_snapshots;
    let mut too_many = None;
    if count > MAX_SNAPSHOTS {
        let why = format!("field 'nb_snapshots' is {}, above QEMU's limit of {MAX_SNAPSHOTS}", h.nb_snapshots);
        if !repairing {
            return (table, damage(MAX_SNAPSHOTS, 0, why));
        }
        count = MAX_SNAPSHOTS;
        too_many = Some(why);
    }
    let avail = raw.file_len().saturating_sub(start).min(MAX_SNAPSHOT_TABLE_BYTES);
    let mut bytes = TableBytes { raw, start, avail: usize::try_from(avail).unwrap_or(0), buf: Vec::new() };
    let mut off = 0usize;
    for i in 0..count {
        let read = |bytes: &mut TableBytes<'_>, at: usize, len: usize| bytes.get(at, len);
        let e = match read(&mut bytes, off, 40) {
            Ok(e) => e,
            Err(err) => return (table, damage(i, off as u64, format!("cannot read the snapshot table: {err}"))),
        };
        let id_len = usize::from(be_u16_at(&e, 12));
        let name_len = usize::from(be_u16_at(&e, 14));
        let extra_data_size = be_u32_at(&e, 36);
        if extra_data_size > MAX_SNAPSHOT_EXTRA_DATA && !repairing {
            let why = format!(
                "snapshot table entry {i}: extra_data_size {extra_data_size} is above {MAX_SNAPSHOT_EXTRA_DATA}"
            );
            return (table, damage(i, off as u64, why));
        }
        let extra_len = extra_data_size as usize;
        let end = off + 40 + extra_len + id_len + name_len;
        if end as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            let why = format!("snapshot table entry {i} ends past QEMU's 64 MiB limit on the table");
            return (table, damage(i, off as u64, why));
        }
        let (extra, strings) =
            match (read(&mut bytes, off + 40, extra_len), read(&mut bytes, off + 40 + extra_len, id_len + name_len)) {
                (Ok(x), Ok(s)) => (x, s),
                (Err(err), _) | (_, Err(err)) => {
                    return (table, damage(i, off as u64, format!("cannot read the snapshot table: {err}")))
                }
            };
        let mut extra = extra;
        extra.truncate(MAX_SNAPSHOT_EXTRA_DATA as usize);
        table.snapshots.push(Snapshot {
            entry_offset: start.saturating_add(off as u64),
            l1_table_offset: be_u64_at(&e, 0),
            l1_size: be_u32_at(&e, 8),
            id: String::from_utf8_lossy(&strings[..id_len]).into_owned(),
            name: String::from_utf8_lossy(&strings[id_len..]).into_owned(),
            date_sec: be_u32_at(&e, 16),
            date_nsec: be_u32_at(&e, 20),
            vm_clock_nsec: be_u64_at(&e, 24),
            vm_state_size: be_u32_at(&e, 32),
            extra_data_size: extra_data_size.min(MAX_SNAPSHOT_EXTRA_DATA),
            extra,
        });
        off = end.div_ceil(8) * 8;
    }
    table.size = off as u64;
    (table, too_many.map(|reason| TableDamage { index: MAX_SNAPSHOTS, offset: start, reason }))
}

/// Reads the snapshot table named by the header; an error names the first entry that cannot
/// be read (see [`read_snapshot_table_lenient`]).
pub fn read_snapshot_table(raw: &QcowRawFile, h: &QcowHeader) -> Result<SnapshotTable> {
    match read_snapshot_table_lenient(raw, h, false) {
        (t, None) => Ok(t),
        (_, Some(d)) => Err(Error::corrupt(d.reason, d.offset)),
    }
}

/// Switches the header to another snapshot table: `nb_snapshots` and `snapshots_offset` in one
/// 12-byte write, then a sync (the new table must already be durable).
pub fn commit_snapshot_table(raw: &QcowRawFile, h: &mut QcowHeader, nb_snapshots: u32, offset: u64) -> Result<()> {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&nb_snapshots.to_be_bytes());
    b[4..].copy_from_slice(&offset.to_be_bytes());
    raw.write_at(&b, field_offset::NB_SNAPSHOTS, "header (nb_snapshots, snapshots_offset)")?;
    raw.sync()?;
    h.nb_snapshots = nb_snapshots;
    h.snapshots_offset = offset;
    Ok(())
}

/// Writes `t` into newly allocated clusters (durable, with their refcounts, before the
/// header names it), switches the header to it in one write, then frees the old table
/// (`old_size` bytes): a crash leaves the old or the new table and at most leaked clusters.
pub(crate) fn replace_snapshot_table(
    raw: &QcowRawFile,
    h: &mut QcowHeader,
    mgr: &mut crate::refcount::RefcountManager,
    t: &SnapshotTable,
    old_size: u64,
) -> Result<()> {
    let cb = raw.cluster_bits();
    let cs = raw.cluster_size();
    let mut bytes = t.to_bytes();
    let nb = u32::try_from(t.snapshots.len()).unwrap_or(u32::MAX);
    let new_offset = if bytes.is_empty() {
        0
    } else {
        let clusters = (bytes.len() as u64).div_ceil(cs);
        bytes.resize(usize::try_from(clusters * cs).unwrap_or(0), 0);
        let first = mgr.alloc(raw, h, clusters)?;
        mgr.write_dirty_blocks(raw)?;
        raw.sync()?;
        raw.write_at(&bytes, first << cb, "snapshot table")?;
        raw.sync()?;
        first << cb
    };
    let old = h.snapshots_offset;
    commit_snapshot_table(raw, h, nb, new_offset)?;
    if old != 0 && old_size > 0 {
        for c in (old >> cb)..(old + old_size).div_ceil(cs) {
            mgr.free_later(c);
        }
        mgr.apply_frees(raw, h)?;
        mgr.write_dirty_blocks(raw)?;
        raw.sync()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_bytes() {
        let s = Snapshot {
            entry_offset: 0,
            l1_table_offset: 0x50000,
            l1_size: 2,
            id: "1".into(),
            name: "before upgrade".into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 123,
            vm_state_size: 0,
            extra_data_size: 24,
            extra: [0u64.to_be_bytes(), (64u64 << 20).to_be_bytes(), u64::MAX.to_be_bytes()].concat(),
        };
        let b = s.to_bytes();
        assert_eq!(b.len() % 8, 0);
        assert_eq!(b.len(), (40 + 24 + 1 + 14usize).div_ceil(8) * 8);
    }

    /// Entries that straddle the 64 KiB read-ahead boundary read like any other.
    #[test]
    fn table_larger_than_the_read_ahead() {
        use crate::storage::MemStorage;
        use std::sync::Arc;
        let mut s = Snapshot {
            entry_offset: 0,
            l1_table_offset: 0x50000,
            l1_size: 1,
            id: "1".into(),
            name: "s0".into(),
            date_sec: 1,
            date_nsec: 2,
            vm_clock_nsec: 3,
            vm_state_size: 0,
            extra_data_size: 24,
            extra: [0u64.to_be_bytes(), (1u64 << 20).to_be_bytes(), 0u64.to_be_bytes()].concat(),
        };
        let n = 4000u32;
        let start = 0x10000u64;
        let mut file = vec![0u8; start as usize];
        for i in 0..n {
            s.id = format!("{i}");
            file.extend_from_slice(&s.to_bytes());
        }
        let mem = Arc::new(MemStorage::default());
        let opts = crate::create::CreateOptions { virtual_size: 1 << 20, ..Default::default() };
        drop(crate::create::create_on(mem.clone(), &opts).unwrap());
        let mut h = QcowHeader::read_from(&*mem).unwrap();
        h.nb_snapshots = n;
        h.snapshots_offset = start;
        let raw = QcowRawFile::new(Arc::new(MemStorage::new(file)), 65536, 4, false).unwrap();
        let t = read_snapshot_table(&raw, &h).unwrap();
        assert_eq!(t.snapshots.len(), n as usize);
        for (i, sn) in t.snapshots.iter().enumerate() {
            assert_eq!(sn.id, format!("{i}"));
            assert_eq!(sn.extra_data_size, 24, "entry {i}");
            assert_eq!(sn.name, "s0");
        }
    }
}
