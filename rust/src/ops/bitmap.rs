//! `qemu-img bitmap`: persistent dirty bitmaps added, removed, cleared, enabled, disabled and
//! merged, with qemu-img 10's refusals and messages.
//!
//! What to do is decided first ([`plan`]: every refusal before any write); doing it
//! ([`apply`]) never writes over a structure the image uses. Every change writes a new
//! directory (and, where bits change, new bitmap tables and data clusters) into newly
//! allocated clusters, in the one order that leaves the old or the new state after a crash:
//!
//! 1. the new clusters' refcounts, synced;
//! 2. the data clusters, tables and directory, synced;
//! 3. the header's bitmaps extension switched in one write (`commit_bitmaps_extension`);
//! 4. only then the old directory, the old tables and the data clusters only they used lose
//!    their reference (a crash before this leaves leaks, which `qemu-img check` reports as such).
//!
//! Unlike QEMU, which flags every bitmap in use while the image is open and rewrites them all
//! at close, no bitmap is ever flagged in use here: a crash never makes a bitmap inconsistent.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::backing::open_image_file;
use crate::bitmap::{
    dir_entry_size, encode_directory, entry_defect, read_bitmap_directory, read_bitmap_table, read_dirty_ranges,
    set_range_bits, table_entries_needed, BitmapCluster, BitmapEntry, FLAG_AUTO, FLAG_IN_USE,
};
use crate::error::{Error, IoContext, Result};
use crate::format::{AUTOCLEAR_BITMAPS, QCOW_MAGIC};
use crate::header::{BitmapsExtension, QcowHeader};
use crate::qcow_file::{OpenOptions, QcowFile};
use crate::raw_file::QcowRawFile;
use crate::refcount::RefcountManager;
use crate::storage::{FileStorage, Storage};
use crate::BackingChoice;

/// QEMU's limit on the number of bitmaps (`QCOW2_MAX_BITMAPS`).
const MAX_BITMAPS: usize = 65535;
/// QEMU's limit on the directory (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`: 1 KiB per bitmap).
const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// QEMU's limit on a bitmap's bytes in memory (`BME_MAX_PHYS_SIZE`).
const MAX_BITMAP_BYTES: u64 = 0x2000_0000;
/// QEMU's limit on a bitmap table's entries (`BME_MAX_TABLE_SIZE`).
const MAX_TABLE_ENTRIES: u64 = 0x0800_0000;
/// QEMU's limit on a bitmap name (`BME_MAX_NAME_SIZE`).
const MAX_NAME_BYTES: usize = 1023;

/// One `qemu-img bitmap` action on one bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapAction {
    /// `--add [-g N]`: a new, empty, enabled bitmap (granularity: QEMU's default when None).
    Add {
        /// Bytes per bit.
        granularity: Option<u64>,
    },
    /// `--remove`.
    Remove,
    /// `--clear`: every bit cleared.
    Clear,
    /// `--enable`: tracks writes.
    Enable,
    /// `--disable`: stops tracking writes.
    Disable,
    /// `--merge SOURCE`: the bits of `source` (of the same image) set in the bitmap too.
    Merge {
        /// The bitmap whose bits are added.
        source: String,
    },
}

/// The new contents of a bitmap's table: per entry, the entry kept (an old data cluster or
/// all-ones), or new bits to write into a new data cluster.
#[derive(Debug)]
enum Slot {
    Keep(u64),
    Write(Vec<u8>),
}

/// What an action does, every refusal decided: the new directory (in order) and, for the
/// bitmaps whose bits change, their new tables.
#[derive(Debug)]
struct Plan {
    dir: Vec<BitmapEntry>,
    /// Index in `dir` -> the new table.
    tables: BTreeMap<usize, Vec<Slot>>,
}

/// Runs `action` on the bitmap `name` of the qcow2 image at `path` (opened for writing and
/// locked as QEMU locks it).
pub fn bitmap(path: &Path, name: &str, action: &BitmapAction) -> Result<()> {
    let file = open_image_file(path, true, "image")?;
    {
        use std::os::unix::fs::FileExt;
        let mut magic = [0u8; 4];
        let n = file.read_at(&mut magic, 0).ctx(|| format!("reading '{}'", path.display()))?;
        if n < 4 || u32::from_be_bytes(magic) != QCOW_MAGIC {
            // A raw image has no bitmaps and cannot store one (QEMU's messages).
            return Err(match action {
                BitmapAction::Add { .. } => Error::InvalidArgument(format!(
                    "Can't store persistent bitmaps to '{}': Operation not supported",
                    path.display()
                )),
                _ => not_found(name),
            });
        }
    }
    crate::lock::lock_image(&file, true, &format!("'{}'", path.display()))?;
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    bitmap_storage(&storage, path, name, action)
}

/// [`bitmap`] on an image already opened (and locked) as `storage`.
pub fn bitmap_storage(storage: &Arc<dyn Storage>, path: &Path, name: &str, action: &BitmapAction) -> Result<()> {
    // A writable open repairs stale refcounts (a dirty lazy-refcounts image) as QEMU's does:
    // the allocator below trusts them.
    let o = OpenOptions { writable: true, rebuild: true, backing: BackingChoice::Disabled, ..OpenOptions::default() };
    drop(QcowFile::open_storage(Arc::clone(storage), path, o)?);
    let mut h = QcowHeader::read_from(&**storage)?;
    let raw = QcowRawFile::new(Arc::clone(storage), h.cluster_size(), h.refcount_order, true)?;
    let dir = directory(&raw, &h)?;
    let Some(plan) = plan(&raw, &h, &dir, path, name, action)? else { return Ok(()) };
    apply(&raw, &mut h, &dir, plan)
}

/// The directory as QEMU loads it (empty when the extension is missing or marked
/// inconsistent: QEMU drops such an extension when it opens the image for writing).
fn directory(raw: &QcowRawFile, h: &QcowHeader) -> Result<Vec<BitmapEntry>> {
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 || h.bitmaps().is_none() {
        return Ok(Vec::new());
    }
    let dir = read_bitmap_directory(raw, h)?;
    if let Some(why) = dir.iter().find_map(|b| entry_defect(h, b)) {
        return Err(Error::corrupt(why, h.bitmaps().map_or(0, |e| e.bitmap_directory_offset)));
    }
    Ok(dir)
}

fn not_found(name: &str) -> Error {
    Error::InvalidArgument(format!("Dirty bitmap '{name}' not found"))
}

/// The bitmap `name` of `dir` (its index), usable unless `allow_in_use` is false and it is
/// flagged in use (QEMU's "inconsistent" bitmaps only accept `--remove`).
fn find(dir: &[BitmapEntry], name: &str, allow_in_use: bool) -> Result<usize> {
    let i = dir.iter().position(|b| b.name == name).ok_or_else(|| not_found(name))?;
    if !allow_in_use && dir[i].flags & FLAG_IN_USE != 0 {
        return Err(Error::InvalidArgument(format!("Bitmap '{name}' is inconsistent and cannot be used")));
    }
    Ok(i)
}

/// Decides what `action` does (None: nothing to write), with QEMU's refusals in its order.
fn plan(
    raw: &QcowRawFile,
    h: &QcowHeader,
    dir: &[BitmapEntry],
    path: &Path,
    name: &str,
    action: &BitmapAction,
) -> Result<Option<Plan>> {
    let mut next = dir.to_vec();
    let mut tables = BTreeMap::new();
    match action {
        BitmapAction::Add { granularity } => {
            let g = add_checks(h, dir, path, name, *granularity)?;
            let bits = u8::try_from(g.trailing_zeros()).unwrap_or(u8::MAX);
            let size = table_entries_needed(h.size, bits, h.cluster_size());
            next.push(BitmapEntry {
                entry_offset: 0,
                flags: FLAG_AUTO,
                bitmap_table_offset: 0,
                bitmap_table_size: u32::try_from(size).unwrap_or(u32::MAX),
                granularity_bits: bits,
                name: name.to_string(),
                name_len: name.len(),
                name_bytes: name.as_bytes().to_vec(),
                bitmap_type: 1,
                extra_data: Vec::new(),
            });
            tables.insert(next.len() - 1, (0..size).map(|_| Slot::Keep(0)).collect());
        }
        BitmapAction::Remove => {
            next.remove(find(dir, name, true)?);
        }
        BitmapAction::Clear => {
            let i = find(dir, name, false)?;
            let t = read_bitmap_table(raw, &dir[i])?;
            if t.iter().all(|&e| e == 0) {
                return Ok(None);
            }
            tables.insert(i, t.iter().map(|_| Slot::Keep(0)).collect());
        }
        BitmapAction::Enable | BitmapAction::Disable => {
            let i = find(dir, name, false)?;
            let flags =
                if *action == BitmapAction::Enable { dir[i].flags | FLAG_AUTO } else { dir[i].flags & !FLAG_AUTO };
            if flags == dir[i].flags {
                return Ok(None);
            }
            next[i].flags = flags;
        }
        BitmapAction::Merge { source } => {
            let i = find(dir, name, false)?;
            let s = find(dir, source, false)?;
            match merged_table(raw, h, &dir[i], &dir[s])? {
                Some(t) => {
                    tables.insert(i, t);
                }
                None => return Ok(None),
            }
        }
    }
    Ok(Some(Plan { dir: next, tables }))
}

/// `--add`'s checks in QEMU's order (`block_dirty_bitmap_add`,
/// `qcow2_co_can_store_new_dirty_bitmap`); returns the granularity.
fn add_checks(h: &QcowHeader, dir: &[BitmapEntry], path: &Path, name: &str, granularity: Option<u64>) -> Result<u64> {
    let invalid = |m: String| Err(Error::InvalidArgument(m));
    if name.is_empty() {
        return invalid("Bitmap name cannot be empty".into());
    }
    let g = match granularity {
        // QEMU takes the granularity as a 32-bit number.
        Some(g) => {
            let g32 = g & 0xffff_ffff;
            if g32 < 512 || !g32.is_power_of_two() {
                return invalid("Granularity must be power of 2 and at least 512".into());
            }
            g32
        }
        // `bdrv_get_default_bitmap_granularity`: the cluster size within 4 KiB..64 KiB.
        None => h.cluster_size().clamp(4096, 65536),
    };
    if dir.iter().any(|b| b.name == name) {
        return invalid(format!("Bitmap already exists: {name}"));
    }
    let cant = |m: &str| invalid(format!("Can't make bitmap '{name}' persistent in '{}': {m}", path.display()));
    if h.version < 3 {
        return cant("Cannot store dirty bitmaps in qcow2 v2 files");
    }
    let bytes = h.size.div_ceil(g).div_ceil(8);
    if bytes > MAX_BITMAP_BYTES || bytes > MAX_TABLE_ENTRIES * h.cluster_size() {
        return cant("Too much space will be occupied by the bitmap. Use larger granularity");
    }
    if name.len() > MAX_NAME_BYTES {
        return cant(&format!("Name length exceeds maximum ({MAX_NAME_BYTES} characters)"));
    }
    if dir.len() + 1 > MAX_BITMAPS {
        return cant("Maximum number of persistent bitmaps is already reached");
    }
    let dir_bytes: u64 = dir.iter().map(|b| dir_entry_size(b.name_len)).sum::<u64>() + dir_entry_size(name.len());
    if dir_bytes > MAX_DIRECTORY_BYTES {
        return cant("Not enough space in the bitmap directory");
    }
    Ok(g)
}

/// The table of `target` with the bits of `source` set in it too (None: nothing changes).
/// Different granularities merge as QEMU merges them: each dirty range of the source sets
/// every bit of the target that covers part of it.
fn merged_table(
    raw: &QcowRawFile,
    h: &QcowHeader,
    target: &BitmapEntry,
    source: &BitmapEntry,
) -> Result<Option<Vec<Slot>>> {
    if target.name == source.name {
        return Ok(None);
    }
    let table = read_bitmap_table(raw, target)?;
    let g = u32::from(target.granularity_bits);
    let bits_per_cluster = raw.cluster_size() * 8;
    let mut bufs: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for (s, len) in read_dirty_ranges(raw, h, source)? {
        set_range_bits(&mut bufs, (s, s + len), g, bits_per_cluster, &mut |t| {
            let Some(&e) = usize::try_from(t).ok().and_then(|i| table.get(i)) else { return Ok(None) };
            BitmapCluster::of(e).bytes(raw, &target.name).map(Some)
        })?;
    }
    let mut changed = false;
    let mut slots: Vec<Slot> = table.iter().map(|&e| Slot::Keep(e)).collect();
    for (t, buf) in bufs {
        let i = usize::try_from(t).unwrap_or(usize::MAX);
        if BitmapCluster::of(table[i]).bytes(raw, &target.name)? != buf {
            slots[i] = Slot::Write(buf);
            changed = true;
        }
    }
    Ok(changed.then_some(slots))
}

/// Writes the plan's new structures into new clusters, switches the header to them, then
/// frees what only the old ones used (see the module documentation for the order).
fn apply(raw: &QcowRawFile, h: &mut QcowHeader, old: &[BitmapEntry], mut plan: Plan) -> Result<()> {
    let cb = h.cluster_bits;
    let cs = h.cluster_size();
    // The directory the old state uses (none when the extension was not trusted: its
    // clusters stay allocated, leaks, as QEMU leaves them).
    let old_ext = if old.is_empty() { None } else { h.bitmaps() };
    let mut mgr = RefcountManager::load(raw, h)?;
    // 1. Allocation (refcounts raised first: a crash leaves leaks).
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    for (&i, slots) in &mut plan.tables {
        let mut table = Vec::with_capacity(slots.len());
        for slot in slots.iter_mut() {
            table.push(match slot {
                Slot::Keep(e) => *e,
                Slot::Write(buf) => {
                    let c = mgr.alloc(raw, h, 1)? << cb;
                    writes.push((c, std::mem::take(buf)));
                    c
                }
            });
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let at = mgr.alloc(raw, h, n)? << cb;
        plan.dir[i].bitmap_table_offset = at;
        writes.push((at, bytes));
    }
    let dir_bytes = encode_directory(&plan.dir);
    let ext = if plan.dir.is_empty() {
        None
    } else {
        let n = (dir_bytes.len() as u64).div_ceil(cs);
        let at = mgr.alloc(raw, h, n)? << cb;
        writes.push((at, dir_bytes.clone()));
        Some(BitmapsExtension {
            nb_bitmaps: u32::try_from(plan.dir.len()).unwrap_or(u32::MAX),
            bitmap_directory_size: dir_bytes.len() as u64,
            bitmap_directory_offset: at,
        })
    };
    mgr.write_dirty_blocks(raw)?;
    raw.sync()?;
    // 2. The new structures, durable before anything points at them.
    for (at, bytes) in &writes {
        raw.write_at(bytes, *at, "bitmap structure (new)")?;
    }
    raw.sync()?;
    // 3. The switch.
    h.commit_bitmaps_extension(raw, ext)?;
    // 4. The old structures lose their references.
    for c in old_clusters(raw, h, old_ext, old, &plan)? {
        mgr.free_later(c);
    }
    if mgr.has_pending_frees() {
        mgr.apply_frees(raw, h)?;
        mgr.write_dirty_blocks(raw)?;
        raw.sync()?;
    }
    Ok(())
}

/// The clusters the old directory, and the old tables and data clusters the new directory no
/// longer names, were using (one reference each).
fn old_clusters(
    raw: &QcowRawFile,
    h: &QcowHeader,
    old_ext: Option<BitmapsExtension>,
    old: &[BitmapEntry],
    plan: &Plan,
) -> Result<Vec<u64>> {
    let cb = h.cluster_bits;
    let cs = h.cluster_size();
    let span = |off: u64, bytes: u64| (off >> cb)..(off + bytes).div_ceil(cs);
    let mut out = Vec::new();
    if let Some(e) = old_ext {
        out.extend(span(e.bitmap_directory_offset, e.bitmap_directory_size));
    }
    // New tables keep some old data clusters.
    let kept: std::collections::HashSet<u64> = plan
        .tables
        .values()
        .flatten()
        .filter_map(|s| match s {
            Slot::Keep(e) => Some(e & crate::format::L2E_OFFSET_MASK),
            Slot::Write(_) => None,
        })
        .filter(|&o| o != 0)
        .collect();
    for b in old {
        let still = plan.dir.iter().any(|n| n.bitmap_table_offset == b.bitmap_table_offset);
        if still {
            continue;
        }
        out.extend(span(b.bitmap_table_offset, u64::from(b.bitmap_table_size) * 8));
        for e in read_bitmap_table(raw, b)? {
            if let BitmapCluster::Data(off) = BitmapCluster::of(e) {
                if !kept.contains(&off) {
                    out.push(off >> cb);
                }
            }
        }
    }
    Ok(out)
}
