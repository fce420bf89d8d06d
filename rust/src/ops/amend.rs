//! `qemu-img amend`: a qcow2 image's options changed in place: `compat` (0.10 <-> 1.1),
//! `refcount_bits`, `lazy_refcounts`, `data_file` (the name), `data_file_raw=off` and `size`,
//! with qemu-img 10's refusals (a different `backing_file` is `rebase`'s job).
//!
//! Every refusal is decided before anything is written (QEMU finds some of them half-way,
//! after earlier options have been applied). The steps then run in QEMU's order: upgrade,
//! refcount width, data file, lazy refcounts, size, downgrade; each one is crash-safe on its
//! own:
//! * upgrade: snapshot entries without v3's extra data get a new table (written and durable
//!   before the 12-byte header switch), then the header is rewritten as v3;
//! * refcount width: `rebuild::change_refcount_order` (new structure in free clusters, one
//!   write of the header's first sector switches to it);
//! * downgrade: zero clusters are expanded table by table ([`downgrade`]) with the usual
//!   order (refcounts, data, sync, L2 table, sync, frees), then the header is rewritten as v2;
//! * header rewrites go through `QcowHeader::commit_header_area` (a crash, even one that tears
//!   a write into sectors, leaves the old or the new header); an upgraded header leaves out
//!   QEMU's optional feature name table when it would not fit in the first sector.

mod downgrade;

use std::path::Path;
use std::sync::Arc;

use crate::backing::open_image_file;
use crate::error::{Error, IoContext, Result};
use crate::format::{
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_CRYPTO, EXT_DATA_FILE, EXT_FEATURE_TABLE,
    QCOW_MAGIC,
};
use crate::header::{HeaderExtension, QcowHeader};
use crate::qcow_file::{OpenOptions, QcowFile};
use crate::raw_file::QcowRawFile;
use crate::refcount::RefcountManager;
use crate::snapshot::read_snapshot_table;
use crate::storage::{FileStorage, Storage};
use crate::BackingChoice;

/// The options of `qemu-img amend -o` (None: unchanged).
#[derive(Clone, Debug, Default)]
pub struct AmendOptions {
    /// "0.10"/"v2" or "1.1"/"v3".
    pub compat: Option<String>,
    /// Refcount width in bits (a power of two, 1 to 64).
    pub refcount_bits: Option<u64>,
    /// Lazy refcounts on or off (on needs compat 1.1).
    pub lazy_refcounts: Option<bool>,
    /// A new name for the external data file ("" removes the name); only for images that
    /// have one.
    pub data_file: Option<String>,
    /// `data_file_raw`: can only be turned off.
    pub data_file_raw: Option<bool>,
    /// A new virtual size (smaller shrinks, as `amend` in QEMU does without asking).
    pub size: Option<u64>,
    /// Accepted only when equal to the current backing file name (QEMU 10).
    pub backing_file: Option<String>,
    /// Accepted only when equal to the current backing format.
    pub backing_format: Option<String>,
}

/// What the options change, every refusal already decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Plan {
    upgrade: bool,
    downgrade: bool,
    refcount_order: Option<u32>,
    /// New `data_file` name (None inside: no name).
    data_file: Option<Option<String>>,
    clear_data_file_raw: bool,
    lazy: Option<bool>,
    size: Option<u64>,
}

impl Plan {
    fn steps(&self) -> u64 {
        [
            self.upgrade,
            self.refcount_order.is_some(),
            self.data_file.is_some() || self.clear_data_file_raw,
            self.lazy.is_some(),
            self.size.is_some(),
            self.downgrade,
        ]
        .iter()
        .filter(|&&b| b)
        .count() as u64
    }
}

/// Amends the qcow2 image at `path` (see the module documentation); `progress(done, total)`
/// after each step.
pub fn amend(path: &Path, opts: &AmendOptions, progress: &dyn Fn(u64, u64) -> Result<()>) -> Result<()> {
    let file = open_image_file(path, true, "image")?;
    {
        use std::os::unix::fs::FileExt;
        let mut magic = [0u8; 4];
        let n = file.read_at(&mut magic, 0).ctx(|| format!("reading '{}'", path.display()))?;
        if n < 4 || u32::from_be_bytes(magic) != QCOW_MAGIC {
            return Err(Error::InvalidArgument("Format driver 'raw' does not support option amendment".into()));
        }
    }
    crate::lock::lock_image(&file, true, &format!("'{}'", path.display()))?;
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    amend_storage(&storage, path, opts, progress)
}

/// [`amend`] on an image already opened (and locked) as `storage`.
pub fn amend_storage(
    storage: &Arc<dyn Storage>,
    path: &Path,
    opts: &AmendOptions,
    progress: &dyn Fn(u64, u64) -> Result<()>,
) -> Result<()> {
    // A writable open repairs stale refcounts (a dirty lazy-refcounts image) as QEMU's does.
    let f = open(storage, path)?;
    let plan = plan(&f, opts)?;
    drop(f);
    let total = plan.steps();
    let mut done = 0;
    let mut step = || {
        done += 1;
        progress(done, total)
    };
    progress(0, total)?;
    let (raw, mut h) = raw_open(storage)?;
    if plan.upgrade {
        upgrade(&raw, &mut h)?;
        step()?;
    }
    if let Some(order) = plan.refcount_order {
        crate::rebuild::change_refcount_order(&raw, &mut h, order)?;
        step()?;
    }
    let (raw, mut h) = raw_open(storage)?;
    if plan.data_file.is_some() || plan.clear_data_file_raw {
        set_data_file(&raw, &mut h, &plan)?;
        step()?;
    }
    if let Some(on) = plan.lazy {
        let bits = if on {
            h.compatible_features | COMPAT_LAZY_REFCOUNTS
        } else {
            h.compatible_features & !COMPAT_LAZY_REFCOUNTS
        };
        h.commit_compatible_features(&raw, bits)?;
        step()?;
    }
    if let Some(size) = plan.size {
        let mut f = open(storage, path)?;
        if size < f.virtual_size() {
            f.shrink(size)?;
        } else {
            f.truncate(size)?;
        }
        f.close()?;
        step()?;
    }
    if plan.downgrade {
        let (raw, mut h) = raw_open(storage)?;
        downgrade::downgrade(&raw, &mut h)?;
        step()?;
    }
    Ok(())
}

/// Opens the image for writing, without its backing file (amend never reads guest data).
fn open(storage: &Arc<dyn Storage>, path: &Path) -> Result<QcowFile> {
    let o = OpenOptions { writable: true, rebuild: true, backing: BackingChoice::Disabled, ..OpenOptions::default() };
    QcowFile::open_storage(Arc::clone(storage), path, o)
}

/// The image's header and a writable raw view with its current refcount width.
fn raw_open(storage: &Arc<dyn Storage>) -> Result<(QcowRawFile, QcowHeader)> {
    let h = QcowHeader::read_from(&**storage)?;
    let raw = QcowRawFile::new(Arc::clone(storage), h.cluster_size(), h.refcount_order, true)?;
    Ok((raw, h))
}

/// Validates the options against the image, in QEMU's order of messages.
fn plan(f: &QcowFile, o: &AmendOptions) -> Result<Plan> {
    let h = f.header();
    let invalid = |m: &str| Err(Error::InvalidArgument(m.to_string()));
    let new_version = match o.compat.as_deref() {
        None => h.version,
        Some("0.10" | "v2") => 2,
        Some("1.1" | "v3") => 3,
        Some(other) => return invalid(&format!("Unknown compatibility level {other}")),
    };
    let mut plan = Plan { upgrade: new_version > h.version, downgrade: new_version < h.version, ..Plan::default() };
    if let Some(bits) = o.refcount_bits {
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            return invalid("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if bits != u64::from(h.refcount_bits()) {
            plan.refcount_order = Some(bits.trailing_zeros());
        }
    }
    if let Some(name) = &o.data_file {
        if !h.has_data_file() {
            return invalid("data-file can only be set for images that use an external data file");
        }
        plan.data_file = Some(if name.is_empty() { None } else { Some(name.clone()) });
    }
    match o.data_file_raw {
        Some(true) if !h.data_file_raw() => return invalid("data-file-raw cannot be set on existing images"),
        Some(false) if h.data_file_raw() => plan.clear_data_file_raw = true,
        _ => {}
    }
    if plan.refcount_order.is_some() && new_version < 3 {
        return invalid(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        );
    }
    let names_backing = o.backing_file.is_some() || o.backing_format.is_some();
    if names_backing && (o.backing_file != h.backing_file || o.backing_format != h.backing_format()) {
        return invalid("Cannot amend the backing file. You can use 'qemu-img rebase' instead.");
    }
    if let Some(on) = o.lazy_refcounts {
        if on && new_version < 3 {
            return invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            );
        }
        if on != h.lazy_refcounts() {
            plan.lazy = Some(on);
        }
    }
    if let Some(size) = o.size {
        if size != f.virtual_size() {
            plan.size = Some(size);
        }
    }
    if plan.downgrade {
        let size = plan.size.unwrap_or(h.size);
        let order = plan.refcount_order.unwrap_or(h.refcount_order);
        downgrade::refusals(f, order, size)?;
        // Lazy refcounts and every other compatible feature go with v3.
        plan.lazy = None;
    }
    Ok(plan)
}

/// `compat=1.1` on a v2 image: snapshot entries get v3's extra data, then the header is
/// rewritten as v3 (QEMU's `qcow2_upgrade`).
fn upgrade(raw: &QcowRawFile, h: &mut QcowHeader) -> Result<()> {
    let table = read_snapshot_table(raw, h)?;
    if table.snapshots.iter().any(|s| s.extra.len() < 16) {
        let mut t = table.clone();
        for s in &mut t.snapshots {
            let mut extra = s.extra.clone();
            if extra.len() < 8 {
                extra = u64::from(s.vm_state_size).to_be_bytes().to_vec();
            }
            extra.truncate(8);
            extra.extend_from_slice(&h.size.to_be_bytes());
            // icount: unknown.
            extra.extend_from_slice(&u64::MAX.to_be_bytes());
            s.extra_data_size = extra.len() as u32;
            s.extra = extra;
        }
        let mut mgr = RefcountManager::load(raw, h)?;
        crate::snapshot::replace_snapshot_table(raw, h, &mut mgr, &t, table.size)?;
    }
    let mut next = h.clone();
    next.version = 3;
    next.header_length = 112;
    next.compression_type = 0;
    next.extra_header_bytes.clear();
    next.incompatible_features = 0;
    next.compatible_features = 0;
    next.autoclear_features = 0;
    next.refcount_order = 4;
    // QEMU's order: backing format, data file, crypto header, feature table, the rest.
    let at = next
        .extensions
        .iter()
        .position(|e| ![EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_CRYPTO].contains(&e.kind))
        .unwrap_or(next.extensions.len());
    let mut with_table = next.clone();
    with_table.extensions.insert(at, HeaderExtension { kind: EXT_FEATURE_TABLE, data: crate::create::feature_table() });
    if with_table.to_bytes()?.len() <= 512 || next.to_bytes()?.len() > 512 {
        next = with_table;
    }
    rewrite_header(raw, h, next)
}

/// The data file name (`data_file=`) and `data_file_raw=off`.
fn set_data_file(raw: &QcowRawFile, h: &mut QcowHeader, plan: &Plan) -> Result<()> {
    if let Some(name) = &plan.data_file {
        let mut next = h.clone();
        match name {
            Some(n) => {
                crate::backing::check_plain_file_name(n, "data file")?;
                match next.extensions.iter_mut().find(|e| e.kind == EXT_DATA_FILE) {
                    Some(e) => e.data = n.as_bytes().to_vec(),
                    None => {
                        next.extensions.insert(0, HeaderExtension { kind: EXT_DATA_FILE, data: n.as_bytes().to_vec() })
                    }
                }
            }
            None => next.extensions.retain(|e| e.kind != EXT_DATA_FILE),
        }
        rewrite_header(raw, h, next)?;
    }
    if plan.clear_data_file_raw {
        h.commit_autoclear_features(raw, h.autoclear_features & !AUTOCLEAR_DATA_FILE_RAW)?;
    }
    Ok(())
}

/// Writes `next` over the header area (torn-write safe: `QcowHeader::commit_header_area`)
/// and makes it the current header.
fn rewrite_header(raw: &QcowRawFile, h: &mut QcowHeader, next: QcowHeader) -> Result<()> {
    h.commit_header_area(raw, &next)?;
    *h = QcowHeader::read_from(&**raw.storage())?;
    Ok(())
}
