//! The snapshot table: its entries, read with QEMU's limits.

use crate::error::{Error, Result};
use crate::format::{be_u16_at, be_u32_at, be_u64_at, MAX_SNAPSHOTS};
use crate::header::QcowHeader;
use crate::raw_file::QcowRawFile;

/// QEMU's limit on a snapshot's extra data.
const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// QEMU's limit on the snapshot table size.
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;

/// One internal snapshot.
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
    /// Bytes of extra data.
    pub extra_data_size: u32,
}

/// The snapshot table: its entries and its total size in bytes.
#[derive(Clone, Debug, Default)]
pub struct SnapshotTable {
    /// The entries.
    pub snapshots: Vec<Snapshot>,
    /// Bytes the table occupies (QEMU's `snapshots_size`).
    pub size: u64,
}

/// Reads the snapshot table named by the header. The table's size is bounded by the file.
pub fn read_snapshot_table(raw: &QcowRawFile, h: &QcowHeader) -> Result<SnapshotTable> {
    if h.nb_snapshots == 0 {
        return Ok(SnapshotTable::default());
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(Error::corrupt(
            format!("field 'nb_snapshots' is {}, above the limit of {MAX_SNAPSHOTS}", h.nb_snapshots),
            crate::header::field_offset::NB_SNAPSHOTS,
        ));
    }
    let start = h.snapshots_offset;
    let avail = raw.file_len().saturating_sub(start).min(MAX_SNAPSHOT_TABLE_BYTES);
    let mut buf = vec![0u8; usize::try_from(avail).unwrap_or(0)];
    raw.read_table_bytes(start, &mut buf, "snapshots_offset (snapshot table)")?;
    let mut snapshots = Vec::with_capacity(h.nb_snapshots as usize);
    let mut off = 0usize;
    for i in 0..h.nb_snapshots {
        let truncated = || {
            Error::offset("snapshots_offset", start, format!("snapshot table entry {i} runs past the end of the file"))
        };
        if off + 40 > buf.len() {
            return Err(truncated());
        }
        let e = &buf[off..];
        let l1_table_offset = be_u64_at(e, 0);
        let l1_size = be_u32_at(e, 8);
        let id_len = usize::from(be_u16_at(e, 12));
        let name_len = usize::from(be_u16_at(e, 14));
        let extra_data_size = be_u32_at(e, 36);
        if extra_data_size > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(Error::corrupt(
                format!("snapshot table entry {i}: extra_data_size {extra_data_size} above {MAX_SNAPSHOT_EXTRA_DATA}"),
                start + off as u64 + 36,
            ));
        }
        let strings = 40 + extra_data_size as usize;
        let end = strings + id_len + name_len;
        if off + end > buf.len() {
            return Err(truncated());
        }
        let id = String::from_utf8_lossy(&e[strings..strings + id_len]).into_owned();
        let name = String::from_utf8_lossy(&e[strings + id_len..end]).into_owned();
        snapshots.push(Snapshot {
            entry_offset: start + off as u64,
            l1_table_offset,
            l1_size,
            id,
            name,
            extra_data_size,
        });
        off += end.div_ceil(8) * 8;
    }
    Ok(SnapshotTable { snapshots, size: off as u64 })
}
