//! Crash states: every mutating operation is recorded on a `RecordingStorage` and replayed into
//! the images a power cut could leave, and each of them must open (with `rebuild: true`), check
//! without corruptions, and keep the guest content the operation promised.
//!
//! The power-cut model: the log is a sequence of writes, syncs, resizes and hole punches. A cut
//! while the ops between two syncs (a *segment*) are in flight leaves every op before the
//! segment applied, plus any subset of the segment's ops, in any order, each write possibly
//! torn (only some of its 512-byte sectors on disk). Every prefix of the log is such a state.
//!
//! Per segment the harness tries: every prefix; then, when the segment holds at most
//! [`EXHAUSTIVE_OPS`] ops, every subset (in log order), every distinct reordering of the ops of
//! a subset that overlap, and every subset with one write torn (all tear patterns of its changed
//! sectors when it has at most 3, else 8 fixed patterns: halves, first/last sector, all but
//! first/last, even/odd sectors); larger segments, or exhaustive lists over the segment's share
//! of the budget, get a seeded random sample (random subsets, orders and tears). States are
//! deduplicated by content. `QCOWRS_CRASH_STATES=N` sets the per-operation budget (default
//! [`DEFAULT_STATES`]); the share checked with qemu-img grows with it.
//!
//! Each state is opened with `OpenOptions { writable: true, rebuild: true }` (must succeed),
//! then `check_raw(Repair::None)` must find no corruption and no check error (leaks are what a
//! crash may leave; problems the base image itself has are tolerated in crash states, never in
//! the completed one), then the guest must read back what the operation promised (see
//! [`check_guest`]). A sample of states (every [`QEMU_EVERY`]th at most, every one for short
//! logs) also goes through `qemu-img check` before the repair-on-open (exit 0 or 3, or what a
//! dirty bit or the base explains) and after it (exit 0 or 3 with qcowrs's leak count), through
//! `qemu-img convert -l snapshot.name=snap1` + `qemu-img compare` against the base's snapshot,
//! and through qcowrs `repair=all` followed by `qemu-img check` (exit 0). A failing state is
//! printed with the ops applied (torn, reordered) and saved under `target/tmp/crash-states/`.
//!
//! The image operations (`resize --shrink`, `rebase`, `commit`, `bitmap`) run through their
//! storage-level entry points (`ops::resize::resize_image`, `ops::rebase::rebase_image`,
//! `ops::commit::commit_images`, `bitmap_storage`). Backing files are read-only inputs: on disk, named by
//! absolute path, so each state opens the one its header names (rebase), or attached in memory
//! to every state (`Recorded::below`: the final base under a commit's overlay). Guest content
//! then includes what the backing files show (`Recorded::watch`: their data ranges are read in
//! every check). A commit writes two files: see [`record_commit`] for why its two phases,
//! replayed one file at a time, are all the states of the pair.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test crate: a failed unwrap is a failed test
#![allow(clippy::print_stderr)] // the per-operation counts are the point of `--nocapture`

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use qcowrs::{
    check_raw, BackingImage, BitmapAction, MemStorage, OpenOptions, QcowFile, QcowHeader, QcowRawFile,
    RecordingStorage, Repair, Storage, StorageOp,
};

const SECTOR: u64 = 512;
/// Segments with at most this many ops are enumerated exhaustively (within the budget).
const EXHAUSTIVE_OPS: usize = 6;
/// Distinct crash states per operation by default.
const DEFAULT_STATES: usize = 1500;
/// Every this many states, one is also checked with qemu-img.
const QEMU_EVERY: usize = 25;
static ZERO_SECTOR: [u8; 512] = [0; 512];

// ---------------------------------------------------------------------------------------------
// Small tools: a seeded generator, the budget, qemu-img.

/// splitmix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

fn budget() -> usize {
    std::env::var("QCOWRS_CRASH_STATES").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_STATES)
}

/// At most this many states per operation go through qemu-img (each costs several processes).
fn qemu_cap() -> usize {
    (budget() / 40).max(12)
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("running a QEMU tool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn qemu_img(args: &[&str]) -> (i32, String) {
    run(Command::new("qemu-img").args(args))
}

/// A number field of qemu-img's JSON output (0 when absent, as qemu-img omits zeros).
fn json_num(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    json.find(&pat)
        .map(|i| json[i + pat.len()..].trim_start().chars().take_while(char::is_ascii_digit).collect::<String>())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `qemu-img check --output=json`: exit code, corruptions, leaks, the JSON.
fn qemu_check(path: &Path) -> (i32, u64, u64, String) {
    let (code, json) = qemu_img(&["check", "--output=json", "-f", "qcow2", path.to_str().unwrap()]);
    (code, json_num(&json, "corruptions"), json_num(&json, "leaks"), json)
}

/// An image made by QEMU: `qemu-img create`, writes, `snapshot -c snap1` (if `after` is
/// `Some`), more writes. Returns its bytes.
fn qemu_base(dir: &Path, name: &str, opts: &str, size: &str, before: &[&str], after: Option<&[&str]>) -> Vec<u8> {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    let (c, out) = qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, ps, size]);
    assert_eq!(c, 0, "{out}");
    let io = |cmds: &[&str]| {
        if cmds.is_empty() {
            return;
        }
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for c in cmds {
            cmd.args(["-c", c]);
        }
        let (c, out) = run(cmd.arg(ps));
        assert!(c == 0 && !out.contains("error") && !out.contains("failed"), "{out}");
    };
    io(before);
    if let Some(after) = after {
        let (c, out) = qemu_img(&["snapshot", "-c", "snap1", ps]);
        assert_eq!(c, 0, "{out}");
        io(after);
    }
    std::fs::read(&p).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The guest model: what the operation promised.

/// Guest content, sparse: 512-byte sectors (absent ones read as zeros).
#[derive(Clone, Default)]
struct Disk(HashMap<u64, Arc<[u8]>>);

impl Disk {
    fn get(&self, s: u64) -> &[u8] {
        self.0.get(&s).map_or(&ZERO_SECTOR[..], |v| v)
    }
}

/// What a completed `flush()` (or `close`, `truncate`) guarantees from log position `pos` on.
struct Promise {
    pos: usize,
    /// Sector writes done before it.
    nwrites: usize,
    /// Size changes done before it.
    nsizes: usize,
    disk: Arc<Disk>,
    size: u64,
}

/// A sector's content after a guest write issued at log position `issue`.
struct SectorWrite {
    issue: usize,
    sector: u64,
    data: Arc<[u8]>,
}

struct Model {
    cur: Disk,
    size: u64,
    writes: Vec<SectorWrite>,
    sizes: Vec<(usize, u64)>,
    /// The first is the content before the operation (position 0).
    promises: Vec<Promise>,
}

impl Model {
    fn new(disk: Disk, size: u64) -> Self {
        let p = Promise { pos: 0, nwrites: 0, nsizes: 0, disk: Arc::new(disk.clone()), size };
        Model { cur: disk, size, writes: Vec::new(), sizes: Vec::new(), promises: vec![p] }
    }

    fn write(&mut self, issue: usize, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        for s in off / SECTOR..end.div_ceil(SECTOR) {
            let mut sec = self.cur.get(s).to_vec();
            let (lo, hi) = (off.max(s * SECTOR), end.min((s + 1) * SECTOR));
            sec[(lo - s * SECTOR) as usize..(hi - s * SECTOR) as usize]
                .copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
            let sec: Arc<[u8]> = sec.into();
            self.cur.0.insert(s, sec.clone());
            self.writes.push(SectorWrite { issue, sector: s, data: sec });
        }
    }

    fn promise(&mut self, pos: usize) {
        self.promises.push(Promise {
            pos,
            nwrites: self.writes.len(),
            nsizes: self.sizes.len(),
            disk: Arc::new(self.cur.clone()),
            size: self.size,
        });
    }
}

/// The guest content of an image: every non-zero sector.
fn guest_disk(bytes: &[u8]) -> (Disk, u64) {
    guest_disk_of(&open_mem(bytes.to_vec(), OpenOptions::default()).unwrap(), &[])
}

/// The guest content of an open image (through its backing chain): every non-zero sector of
/// what it allocates itself and of the `watch` ranges (where its backing files hold data).
fn guest_disk_of(f: &QcowFile, watch: &[(u64, u64)]) -> (Disk, u64) {
    let mut d = Disk::default();
    let mut ranges: Vec<(u64, u64)> =
        f.allocated_ranges().unwrap().into_iter().filter(|r| r.2 != "zero").map(|r| (r.0, r.1)).collect();
    ranges.extend(
        watch.iter().map(|&(s, n)| (s.min(f.virtual_size()), n.min(f.virtual_size() - s.min(f.virtual_size())))),
    );
    for (start, len) in ranges {
        let mut buf = vec![0u8; len as usize];
        f.read_at(&mut buf, start).unwrap();
        for (i, s) in buf.chunks(SECTOR as usize).enumerate() {
            if s.iter().any(|&b| b != 0) {
                d.0.insert(start / SECTOR + i as u64, s.into());
            }
        }
    }
    (d, f.virtual_size())
}

/// Every range an image allocates itself (a backing file's data, to be watched in overlays).
fn allocated_ranges(bytes: &[u8]) -> Vec<(u64, u64)> {
    let f = open_mem(bytes.to_vec(), OpenOptions::default()).unwrap();
    f.allocated_ranges().unwrap().into_iter().map(|r| (r.0, r.1)).collect()
}

/// A qcow2 image held in memory as the backing file of another.
fn mem_backing(bytes: &[u8]) -> qcowrs::Result<BackingImage> {
    Ok(BackingImage::qcow2(open_mem(bytes.to_vec(), OpenOptions::default())?))
}

fn open_mem(bytes: Vec<u8>, opts: OpenOptions) -> qcowrs::Result<QcowFile> {
    QcowFile::open_storage(Arc::new(MemStorage::new(bytes)), Path::new("<memory>"), opts)
}

// ---------------------------------------------------------------------------------------------
// Recording an operation.

/// What an operation gets: the recording storage, and the guest model its API calls update.
struct Ctx {
    rec: Arc<RecordingStorage>,
    log: Vec<StorageOp>,
    model: Model,
}

impl Ctx {
    fn storage(&self) -> Arc<dyn Storage> {
        self.rec.clone()
    }
    /// The log position now.
    fn pos(&mut self) -> usize {
        self.log.extend(self.rec.take_log());
        self.log.len()
    }
    fn open(&mut self) -> QcowFile {
        let opts = OpenOptions { writable: true, ..OpenOptions::default() };
        QcowFile::open_storage(self.storage(), Path::new("<recorded>"), opts).unwrap()
    }
    fn write(&mut self, f: &mut QcowFile, off: u64, data: &[u8]) {
        let p = self.pos();
        f.write_at(data, off).unwrap();
        self.model.write(p, off, data);
    }
    /// A whole cluster written compressed (`convert -c`'s write).
    fn write_compressed(&mut self, f: &mut QcowFile, off: u64, data: &[u8]) {
        let p = self.pos();
        f.write_compressed(off, data).unwrap();
        self.model.write(p, off, data);
    }
    fn write_zeroes(&mut self, f: &mut QcowFile, off: u64, len: u64) {
        let p = self.pos();
        f.write_zeroes(off, len).unwrap();
        self.model.write(p, off, &vec![0u8; len as usize]);
    }
    /// v3 without a backing file: whole clusters read as zeros, partial ones are unchanged.
    fn discard(&mut self, f: &mut QcowFile, off: u64, len: u64) {
        let p = self.pos();
        f.discard(off, len).unwrap();
        let (cs, size) = (f.cluster_size(), f.virtual_size());
        let mut c = off.div_ceil(cs) * cs;
        while c < off + len && (c + cs <= off + len || off + len == size) {
            let n = cs.min(size - c);
            self.model.write(p, c, &vec![0u8; n as usize]);
            c += cs;
        }
    }
    fn flush(&mut self, f: &mut QcowFile) {
        f.flush().unwrap();
        let p = self.pos();
        self.model.promise(p);
    }
    fn close(&mut self, mut f: QcowFile) {
        f.close().unwrap();
        drop(f);
        let p = self.pos();
        self.model.promise(p);
    }
    fn truncate(&mut self, f: &mut QcowFile, size: u64) {
        let p = self.pos();
        f.truncate(size).unwrap();
        self.model.size = size;
        self.model.sizes.push((p, size));
        let p = self.pos();
        self.model.promise(p);
    }
}

/// An operation recorded on a base image.
struct Recorded {
    name: String,
    base: Vec<u8>,
    log: Vec<StorageOp>,
    model: Model,
    /// Labels for log ops (what the written offsets hold in the base or the final image).
    layout: Layout,
    /// The completed operation may leave leaks (by its contract).
    may_leak: bool,
    /// A qcow2 image attached as the backing file of every state (whatever the state's header
    /// names): the final base under the overlay a commit empties. `None`: the header's.
    below: Option<Vec<u8>>,
    /// Guest ranges read in every check besides what the state allocates itself: where its
    /// backing files hold data.
    watch: Vec<(u64, u64)>,
    /// An overlay whose guest content over every state (as it is, unrepaired: an overlay opens
    /// its backing file read-only) must read exactly this: the base a commit writes into.
    above: Option<(Vec<u8>, Disk)>,
    /// A shrink from this size: a state left smaller must read zeros past its last cluster
    /// once grown back to it (no reference past the end survives to reappear).
    regrow: Option<u64>,
    /// An operation that replaces the whole guest content (applying a snapshot): every state
    /// must read wholly the content before it or wholly this one (the completed one: this
    /// one), never a mix; the model's promises are not used.
    either: Option<(Disk, u64)>,
}

fn record(name: &str, base: &[u8], op: impl FnOnce(&mut Ctx)) -> Recorded {
    record_with_disk(name, base, guest_disk(base), op)
}

/// [`record`] for a base image that does not open as it is (its guest content given).
fn record_with_disk(name: &str, base: &[u8], (disk, size): (Disk, u64), op: impl FnOnce(&mut Ctx)) -> Recorded {
    let mem = Arc::new(MemStorage::new(base.to_vec()));
    let rec = Arc::new(RecordingStorage::new(mem.clone()));
    let mut ctx = Ctx { rec, log: Vec::new(), model: Model::new(disk, size) };
    op(&mut ctx);
    ctx.pos();
    let mut layout = Layout::default();
    layout.add(base);
    layout.add(&mem.to_vec());
    Recorded {
        name: name.to_string(),
        base: base.to_vec(),
        log: ctx.log,
        model: ctx.model,
        layout,
        may_leak: false,
        below: None,
        watch: Vec::new(),
        above: None,
        regrow: None,
        either: None,
    }
}

/// Opens a state (or the base) as the harness does: over `rec.below` if set.
fn open_state(rec: &Recorded, storage: Arc<dyn Storage>, opts: OpenOptions) -> qcowrs::Result<QcowFile> {
    let path = Path::new("<crash state>");
    match &rec.below {
        Some(b) => QcowFile::open_storage_with_backing(storage, path, opts, Some(mem_backing(b)?)),
        None => QcowFile::open_storage(storage, path, opts),
    }
}

// ---------------------------------------------------------------------------------------------
// Naming what a log op wrote (for failure reports).

#[derive(Default)]
struct Layout {
    cs: u64,
    /// (first byte, end, what)
    regions: Vec<(u64, u64, String)>,
}

impl Layout {
    fn add(&mut self, bytes: &[u8]) {
        let mem = MemStorage::new(bytes.to_vec());
        let Ok(h) = QcowHeader::read_from(&mem) else { return };
        let cs = h.cluster_size();
        self.cs = cs;
        self.regions.push((0, cs, "header".into()));
        let l1 = (h.l1_table_offset, h.l1_table_offset + 8 * u64::from(h.l1_size));
        self.regions.push((l1.0, l1.1, format!("L1 table@0x{:x}", l1.0)));
        let rt = (h.refcount_table_offset, h.refcount_table_offset + u64::from(h.refcount_table_clusters) * cs);
        self.regions.push((rt.0, rt.1, format!("reftable@0x{:x}", rt.0)));
        let words = |off: u64, n: u64| -> Vec<u64> {
            let mut b = vec![0u8; (n * 8) as usize];
            let _ = mem.read_at(&mut b, off);
            b.chunks(8).map(|c| u64::from_be_bytes(c.try_into().unwrap())).collect()
        };
        for e in words(rt.0, (rt.1 - rt.0) / 8) {
            let o = e & 0x00ff_ffff_ffff_fe00;
            if o != 0 {
                self.regions.push((o, o + cs, format!("refblock@0x{o:x}")));
            }
        }
        for e in words(l1.0, u64::from(h.l1_size)) {
            let o = e & 0x00ff_ffff_ffff_fe00;
            if o != 0 {
                self.regions.push((o, o + cs, format!("L2 table@0x{o:x}")));
            }
        }
    }

    fn name(&self, off: u64) -> String {
        match self.regions.iter().rev().find(|r| (r.0..r.1).contains(&off)) {
            Some(r) => r.2.clone(),
            None => format!("data cluster@0x{:x}", off & !(self.cs.max(1) - 1)),
        }
    }

    fn describe(&self, i: usize, op: &StorageOp) -> String {
        match op {
            StorageOp::Write { offset, data } => {
                format!("#{i} write {} bytes at 0x{offset:x} ({})", data.len(), self.name(*offset))
            }
            StorageOp::PunchHole { offset, len } => format!("#{i} punch 0x{len:x} at 0x{offset:x}"),
            StorageOp::SetLen(n) => format!("#{i} set_len 0x{n:x}"),
            StorageOp::Sync => format!("#{i} sync"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Crash states of a segment: variants of its pending ops.

/// One op of a variant: applied whole, or only the listed sectors (a torn write).
#[derive(Clone, Debug)]
struct Part {
    op: usize,
    sectors: Option<Vec<u64>>,
}

type Variant = Vec<Part>;

fn whole(ops: &[usize]) -> Variant {
    ops.iter().map(|&op| Part { op, sectors: None }).collect()
}

fn op_range(op: &StorageOp) -> Option<(u64, u64)> {
    match op {
        StorageOp::Write { offset, data } => Some((*offset, offset + data.len() as u64)),
        StorageOp::PunchHole { offset, len } => Some((*offset, offset + len)),
        _ => None,
    }
}

/// Whether the order of two ops can matter (a resize orders against everything).
fn overlap(a: &StorageOp, b: &StorageOp) -> bool {
    match (op_range(a), op_range(b)) {
        (Some(x), Some(y)) => x.0 < y.1 && y.0 < x.1,
        _ => !matches!(a, StorageOp::Sync) && !matches!(b, StorageOp::Sync),
    }
}

/// The sectors an op changes relative to the durable bytes (tearing the others changes nothing).
fn changed_sectors(op: &StorageOp, durable: &[u8]) -> Vec<u64> {
    let Some((lo, hi)) = op_range(op) else { return Vec::new() };
    (lo / SECTOR..hi.div_ceil(SECTOR))
        .filter(|&s| {
            let (a, b) = (lo.max(s * SECTOR), hi.min((s + 1) * SECTOR));
            let cur = durable.get(a as usize..b as usize);
            match op {
                StorageOp::Write { offset, data } => cur != Some(&data[(a - offset) as usize..(b - offset) as usize]),
                _ => cur.is_some_and(|c| c.iter().any(|&x| x != 0)),
            }
        })
        .collect()
}

/// Tear patterns of a write whose changed sectors are `ch`: proper, non-empty subsets.
fn tear_patterns(ch: &[u64]) -> Vec<Vec<u64>> {
    let m = ch.len();
    let mut out: Vec<Vec<u64>> = Vec::new();
    if m < 2 {
        return out;
    }
    if m <= 3 {
        for mask in 1..(1u32 << m) - 1 {
            out.push(ch.iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, &s)| s).collect());
        }
        return out;
    }
    let h = m / 2;
    let pick = |odd: usize| ch.iter().enumerate().filter(|(i, _)| i % 2 == odd).map(|(_, &s)| s).collect();
    for p in [
        ch[..1].to_vec(),
        ch[m - 1..].to_vec(),
        ch[..h].to_vec(),
        ch[h..].to_vec(),
        ch[1..].to_vec(),
        ch[..m - 1].to_vec(),
        pick(0),
        pick(1),
    ] {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Calls `f` with every permutation of `v` (Heap's algorithm).
fn permutations(v: &mut Vec<usize>, k: usize, f: &mut dyn FnMut(&[usize])) {
    if k <= 1 {
        f(v);
        return;
    }
    for i in 0..k {
        permutations(v, k - 1, f);
        let j = if k % 2 == 0 { i } else { 0 };
        v.swap(j, k - 1);
    }
}

/// Every distinct order of the ops of `subset` that overlap another (the others stay in log
/// order): one per assignment of "which comes last" to the overlapping pairs.
fn reorders(subset: &[usize], log: &[StorageOp], out: &mut Vec<Variant>) {
    let involved: Vec<usize> =
        subset.iter().copied().filter(|&a| subset.iter().any(|&b| a != b && overlap(&log[a], &log[b]))).collect();
    if involved.len() < 2 {
        return;
    }
    let mut pairs = Vec::new();
    for (i, &a) in involved.iter().enumerate() {
        for &b in &involved[i + 1..] {
            if overlap(&log[a], &log[b]) {
                pairs.push((a, b));
            }
        }
    }
    let rest: Vec<usize> = subset.iter().copied().filter(|o| !involved.contains(o)).collect();
    let mut seen: HashSet<u64> = HashSet::from([0]); // log order
    let mut perm = involved.clone();
    let n = perm.len();
    permutations(&mut perm, n, &mut |p| {
        let pos = |o: usize| p.iter().position(|&x| x == o).unwrap_or(0);
        let sig = pairs.iter().enumerate().fold(0u64, |m, (k, &(a, b))| m | u64::from(pos(a) > pos(b)) << (k % 64));
        if seen.insert(sig) {
            let mut v = whole(&rest);
            v.extend(whole(p));
            out.push(v);
        }
    });
}

/// The exhaustive variants of a small segment: every subset in log order, every distinct
/// reordering of each subset, every subset with one write torn.
fn exhaustive(pending: &[usize], log: &[StorageOp], changed: &HashMap<usize, Vec<u64>>) -> Vec<Variant> {
    let n = pending.len();
    let mut out = Vec::new();
    for mask in 0u32..(1 << n) {
        let subset: Vec<usize> =
            pending.iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, &o)| o).collect();
        out.push(whole(&subset));
        reorders(&subset, log, &mut out);
        for &w in &subset {
            for pat in tear_patterns(&changed[&w]) {
                out.push(subset.iter().map(|&op| Part { op, sectors: (op == w).then(|| pat.clone()) }).collect());
            }
        }
    }
    out
}

/// A random crash state of a segment: a random subset, maybe shuffled, writes maybe torn.
fn random_variant(rng: &mut Rng, pending: &[usize], changed: &HashMap<usize, Vec<u64>>) -> Variant {
    let q = [25, 50, 75, 90][rng.below(4) as usize];
    let mut v: Vec<usize> = pending.iter().copied().filter(|_| rng.chance(q)).collect();
    if rng.chance(50) {
        rng.shuffle(&mut v);
    }
    v.into_iter()
        .map(|op| {
            let ch = &changed[&op];
            let sectors =
                (ch.len() >= 2 && rng.chance(30)).then(|| ch.iter().copied().filter(|_| rng.chance(50)).collect());
            Part { op, sectors }
        })
        .collect()
}

/// Applies an op (or the listed sectors of it) to image bytes; notes the sectors touched.
fn apply(b: &mut Vec<u8>, op: &StorageOp, sectors: Option<&[u64]>, touched: &mut BTreeSet<u64>) {
    let Some((lo, hi)) = op_range(op) else {
        if let StorageOp::SetLen(n) = op {
            b.resize(*n as usize, 0);
        }
        return;
    };
    let all: Vec<u64>;
    let list = match sectors {
        Some(s) => s,
        None => {
            all = (lo / SECTOR..hi.div_ceil(SECTOR)).collect();
            &all
        }
    };
    for &s in list {
        let (a, e) = (lo.max(s * SECTOR) as usize, hi.min((s + 1) * SECTOR) as usize);
        touched.insert(s);
        match op {
            StorageOp::Write { offset, data } => {
                if b.len() < e {
                    b.resize(e, 0);
                }
                b[a..e].copy_from_slice(&data[a - *offset as usize..e - *offset as usize]);
            }
            _ => {
                let e = e.min(b.len());
                if a < e {
                    b[a..e].fill(0);
                }
            }
        }
    }
}

/// The image bytes of a variant over the durable bytes, and a key of what it changed.
fn build(durable: &[u8], log: &[StorageOp], v: &Variant) -> (Vec<u8>, u64) {
    let mut b = durable.to_vec();
    let mut touched = BTreeSet::new();
    for p in v {
        apply(&mut b, &log[p.op], p.sectors.as_deref(), &mut touched);
    }
    let mut h = DefaultHasher::new();
    b.len().hash(&mut h);
    for s in touched {
        let r = (s * SECTOR) as usize..(((s + 1) * SECTOR) as usize).min(b.len());
        let cur = b.get(r.clone());
        if cur.is_some() && cur != durable.get(r) {
            (s, cur).hash(&mut h);
        }
    }
    (b, h.finish())
}

fn describe_variant(rec: &Recorded, d: usize, e: usize, v: &Variant) -> String {
    let mut s = format!(
        "crash while ops #{d}..#{} were in flight (ops before #{d} durable); applied, in this order:",
        e.saturating_sub(1)
    );
    for p in v {
        s += &format!("\n      {}", rec.layout.describe(p.op, &rec.log[p.op]));
        if let Some(sec) = &p.sectors {
            let list: Vec<String> = sec.iter().map(|x| format!("0x{:x}", x * SECTOR)).collect();
            s += &format!(" TORN: only the sectors at {}", list.join(","));
        }
    }
    let missing: Vec<String> = (d..e).filter(|o| !v.iter().any(|p| p.op == *o)).map(|o| format!("#{o}")).collect();
    s += &format!("\n      not applied: {}", if missing.is_empty() { "none".into() } else { missing.join(" ") });
    s
}

// ---------------------------------------------------------------------------------------------
// Checking one state.

/// A problem the check may find, as (kind, host offset).
type ProblemKey = (String, Option<u64>);

/// What a state that passed looks like after its repair-on-open.
struct Passed {
    leaks: u64,
    repaired: Vec<u8>,
}

fn summary(b: &[u8]) -> String {
    if b.iter().all(|&x| x == b[0]) {
        format!("{}x{:02x}", b.len(), b[0])
    } else {
        let head: Vec<String> = b[..8].iter().map(|x| format!("{x:02x}")).collect();
        format!("{}..", head.join(""))
    }
}

/// Opens the state as a user would after the power cut (read-write, rebuild on open), checks
/// it, and compares the guest content with the promises in force at crash point `e`.
fn check_state(rec: &Recorded, e: usize, bytes: Vec<u8>, tolerated: &HashSet<ProblemKey>) -> Result<Passed, String> {
    if let Some((overlay, want)) = &rec.above {
        check_above(overlay, want, bytes.clone(), &rec.watch)?;
    }
    let mem = Arc::new(MemStorage::new(bytes));
    let opts = OpenOptions { writable: true, rebuild: true, ..OpenOptions::default() };
    let f = open_state(rec, mem.clone(), opts).map_err(|e| format!("open(writable, rebuild) failed: {e}"))?;
    let mut h = QcowHeader::read_from(&*mem).map_err(|e| format!("header after open: {e}"))?;
    let raw = QcowRawFile::new(mem.clone(), h.cluster_size(), h.refcount_order, false).map_err(|e| e.to_string())?;
    let r = check_raw(&raw, &mut h, Repair::None, false).map_err(|e| format!("check failed: {e}"))?;
    let bad: Vec<String> = r
        .problems
        .list
        .iter()
        .filter(|p| p.kind != "leak" && !tolerated.contains(&(p.kind.to_string(), p.host_offset)))
        .map(|p| format!("{}: {}", p.kind, p.message))
        .collect();
    if !bad.is_empty() || (tolerated.is_empty() && r.counts.corruptions + r.counts.check_errors > 0) {
        return Err(format!(
            "check after the repair-on-open: {} corruption(s), {} check error(s), {} leak(s); problems: {}",
            r.counts.corruptions,
            r.counts.check_errors,
            r.counts.leaks,
            bad.join("; ")
        ));
    }
    check_guest(rec, e, &f)?;
    drop(f);
    let repaired = mem.to_vec();
    if let Some(size) = rec.regrow {
        check_regrow(&repaired, size)?;
    }
    Ok(Passed { leaks: r.counts.leaks, repaired })
}

/// A state smaller than `size` grown back to it (`truncate`) reads zeros past its last
/// cluster: a reference past the end that survived a crash would show the dropped data again.
fn check_regrow(repaired: &[u8], size: u64) -> Result<(), String> {
    let mut f = open_mem(repaired.to_vec(), OpenOptions { writable: true, ..OpenOptions::default() })
        .map_err(|e| format!("regrow: open: {e}"))?;
    let cs = f.cluster_size();
    let end = f.virtual_size().div_ceil(cs) * cs;
    if end >= size {
        return Ok(());
    }
    f.truncate(size).map_err(|e| format!("regrow to {size}: {e}"))?;
    for (start, len, kind) in f.allocated_ranges().map_err(|e| format!("regrow: allocated_ranges: {e}"))? {
        let (a, b) = (start.max(end), (start + len).min(size));
        if kind == "zero" || a >= b {
            continue;
        }
        let mut buf = vec![0u8; (b - a) as usize];
        f.read_at(&mut buf, a).map_err(|e| format!("regrow: read: {e}"))?;
        if let Some(i) = buf.iter().position(|&x| x != 0) {
            return Err(format!(
                "grown back to {size} bytes, guest 0x{:x} (past the end 0x{end:x}) reads {:02x}, not zero: a reference past the end survived",
                a + i as u64,
                buf[i]
            ));
        }
    }
    Ok(())
}

/// Guest bytes: flushed writes read back exactly; sectors written since the last completed
/// flush read as one of the values they held since; everything else as before.
fn check_guest(rec: &Recorded, e: usize, f: &QcowFile) -> Result<(), String> {
    if let Some(new) = &rec.either {
        return check_either(rec, e, new, f);
    }
    let m = &rec.model;
    let p = m.promises.iter().rev().find(|p| p.pos <= e).unwrap();
    let mut sizes = vec![p.size];
    sizes.extend(m.sizes[p.nsizes..].iter().filter(|(i, _)| *i < e).map(|&(_, s)| s));
    if !sizes.contains(&f.virtual_size()) {
        return Err(format!("virtual size {} is none of {sizes:?}", f.virtual_size()));
    }
    let mut extra: HashMap<u64, Vec<&[u8]>> = HashMap::new();
    for w in m.writes[p.nwrites..].iter().filter(|w| w.issue < e) {
        extra.entry(w.sector).or_default().push(&w.data);
    }
    let mut sectors: BTreeSet<u64> = p.disk.0.keys().chain(extra.keys()).copied().collect();
    add_ranges(&mut sectors, f, &rec.watch)?;
    let mut bad = Vec::new();
    read_sectors(f, sectors, |s, got| {
        let want = p.disk.get(s);
        if got != want && !extra.get(&s).is_some_and(|l| l.contains(&got)) {
            let alt: Vec<String> = extra.get(&s).map_or(Vec::new(), |l| l.iter().map(|x| summary(x)).collect());
            bad.push(format!(
                "guest 0x{:x} reads {} (promised {}{})",
                s * SECTOR,
                summary(got),
                summary(want),
                if alt.is_empty() { String::new() } else { format!(" or in flight {}", alt.join("/")) }
            ));
        }
    })?;
    if bad.is_empty() {
        return Ok(());
    }
    let n = bad.len();
    bad.truncate(6);
    Err(format!("{n} guest sector(s) differ: {}", bad.join("; ")))
}

/// [`Recorded::either`]: the guest is wholly the content before the operation or wholly `new`
/// (only `new` once the operation completed).
fn check_either(rec: &Recorded, e: usize, new: &(Disk, u64), f: &QcowFile) -> Result<(), String> {
    let old = &rec.model.promises[0];
    let mut options = vec![(&new.0, new.1, "new")];
    if e < rec.log.len() {
        options.push((&*old.disk, old.size, "old"));
    }
    let mut why = Vec::new();
    for (disk, size, name) in options {
        if f.virtual_size() != size {
            why.push(format!("not the {name} content (virtual size {} != {size})", f.virtual_size()));
            continue;
        }
        let mut sectors: BTreeSet<u64> = disk.0.keys().copied().collect();
        add_ranges(&mut sectors, f, &rec.watch)?;
        let mut first_bad = None;
        read_sectors(f, sectors, |s, got| {
            if first_bad.is_none() && got != disk.get(s) {
                first_bad = Some((s, summary(got), summary(disk.get(s))));
            }
        })?;
        match first_bad {
            None => return Ok(()),
            Some((s, got, want)) => {
                why.push(format!("not the {name} content (guest 0x{:x} reads {got}, not {want})", s * SECTOR));
            }
        }
    }
    Err(why.join("; "))
}

/// The sectors of what `f` allocates itself and of the `watch` ranges.
fn add_ranges(sectors: &mut BTreeSet<u64>, f: &QcowFile, watch: &[(u64, u64)]) -> Result<(), String> {
    for (start, len, kind) in f.allocated_ranges().map_err(|e| format!("allocated_ranges: {e}"))? {
        if kind != "zero" {
            sectors.extend(start / SECTOR..(start + len).div_ceil(SECTOR));
        }
    }
    for &(start, len) in watch {
        sectors.extend(start / SECTOR..(start + len).div_ceil(SECTOR));
    }
    Ok(())
}

/// Reads the guest sectors (those inside the disk), in runs, and hands each to `each`.
fn read_sectors(f: &QcowFile, sectors: BTreeSet<u64>, mut each: impl FnMut(u64, &[u8])) -> Result<(), String> {
    let end = f.virtual_size() / SECTOR;
    let v: Vec<u64> = sectors.into_iter().filter(|&s| s < end).collect();
    let mut i = 0;
    while i < v.len() {
        let mut j = i + 1;
        while j < v.len() && v[j] == v[j - 1] + 1 && j - i < 4096 {
            j += 1;
        }
        let mut buf = vec![0u8; (j - i) * SECTOR as usize];
        f.read_at(&mut buf, v[i] * SECTOR).map_err(|e| format!("guest read at 0x{:x}: {e}", v[i] * SECTOR))?;
        for (n, got) in buf.chunks(SECTOR as usize).enumerate() {
            each(v[i] + n as u64, got);
        }
        i = j;
    }
    Ok(())
}

/// The overlay over the state `below` (unrepaired, read-only as an overlay opens its backing
/// file) must read exactly `want`.
fn check_above(overlay: &[u8], want: &Disk, below: Vec<u8>, watch: &[(u64, u64)]) -> Result<(), String> {
    let b = open_mem(below, OpenOptions::default()).map_err(|e| format!("read-only open as a backing file: {e}"))?;
    let mut sectors: BTreeSet<u64> = want.0.keys().copied().collect();
    add_ranges(&mut sectors, &b, watch)?;
    let mem = Arc::new(MemStorage::new(overlay.to_vec()));
    let f = QcowFile::open_storage_with_backing(
        mem,
        Path::new("<overlay>"),
        OpenOptions::default(),
        Some(BackingImage::qcow2(b)),
    )
    .map_err(|e| format!("the overlay does not open over this state: {e}"))?;
    add_ranges(&mut sectors, &f, &[])?;
    let mut bad = Vec::new();
    read_sectors(&f, sectors, |s, got| {
        if got != want.get(s) {
            bad.push(format!("0x{:x} reads {} (was {})", s * SECTOR, summary(got), summary(want.get(s))));
        }
    })?;
    if bad.is_empty() {
        return Ok(());
    }
    let n = bad.len();
    bad.truncate(6);
    Err(format!("the overlay over this state: {n} guest sector(s) differ: {}", bad.join("; ")))
}

/// Problems (not leaks) the base image itself has after its repair-on-open: a crash before the
/// operation's first write leaves them, so they are tolerated in crash states (never in the
/// completed state).
fn base_problems(rec: &Recorded) -> HashSet<ProblemKey> {
    let mem = Arc::new(MemStorage::new(rec.base.clone()));
    let opts = OpenOptions { writable: true, rebuild: true, ..OpenOptions::default() };
    drop(open_state(rec, mem.clone(), opts).unwrap());
    let mut h = QcowHeader::read_from(&*mem).unwrap();
    let raw = QcowRawFile::new(mem.clone(), h.cluster_size(), h.refcount_order, false).unwrap();
    let r = check_raw(&raw, &mut h, Repair::None, false).unwrap();
    r.problems.list.iter().filter(|p| p.kind != "leak").map(|p| (p.kind.to_string(), p.host_offset)).collect()
}

// ---------------------------------------------------------------------------------------------
// qemu-img on a sample of states.

struct Qemu {
    dir: PathBuf,
    /// The snapshot's content as QEMU reads it from the base image.
    snapshot: Option<PathBuf>,
    /// qemu-img check of the base before and after its repair-on-open: (exit, corruptions).
    base_pre: (i32, u64),
    base_post: (i32, u64),
}

impl Qemu {
    fn new(dir: &Path, rec: &Recorded, snapshot: bool) -> Self {
        let mut q = Qemu { dir: dir.to_path_buf(), snapshot: None, base_pre: (0, 0), base_post: (0, 0) };
        let st = q.write("base.qcow2", &rec.base);
        if snapshot {
            let exp = dir.join("snap1-expected.qcow2");
            let (c, out) =
                qemu_img(&["convert", "-l", "snapshot.name=snap1", "-O", "qcow2", &st, exp.to_str().unwrap()]);
            assert_eq!(c, 0, "{out}");
            q.snapshot = Some(exp);
        }
        let (c, corr, _, _) = qemu_check(Path::new(&st));
        q.base_pre = (c, corr);
        let mem = Arc::new(MemStorage::new(rec.base.clone()));
        let opts = OpenOptions { writable: true, rebuild: true, ..OpenOptions::default() };
        drop(open_state(rec, mem.clone(), opts).unwrap());
        let st = q.write("base-post.qcow2", &mem.to_vec());
        let (c, corr, _, _) = qemu_check(Path::new(&st));
        q.base_post = (c, corr);
        q
    }

    fn write(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// Exit 0 or 3 (at most leaks), or what the base itself had, or (before the repair-on-open)
    /// anything but a failed check on an image whose dirty bit declares its refcounts stale.
    fn acceptable(code: i32, corr: u64, base: (i32, u64), dirty: bool) -> bool {
        code == 0 || code == 3 || (code == 2 && (dirty || (base.0 == 2 && corr <= base.1)))
    }

    /// qemu-img check before and after the repair-on-open (with the leak count qcowrs found),
    /// the snapshot's content, and qemu-img check after qcowrs repaired the leaks (exit 0).
    fn sample(&self, pre: &[u8], passed: &Passed) -> Result<(), String> {
        let st = self.write("state.qcow2", pre);
        let (c, corr, _, json) = qemu_check(Path::new(&st));
        let dirty = QcowHeader::read_from(&MemStorage::new(pre.to_vec())).is_ok_and(|h| h.is_dirty());
        if !Self::acceptable(c, corr, self.base_pre, dirty) {
            return Err(format!("qemu-img check of the crash state (before the repair-on-open): exit {c}: {json}"));
        }
        let st = self.write("state-post.qcow2", &passed.repaired);
        let (c, corr, leaks, json) = qemu_check(Path::new(&st));
        if !Self::acceptable(c, corr, self.base_post, false) || leaks != passed.leaks {
            return Err(format!(
                "qemu-img check after the repair-on-open: exit {c}, {leaks} leaks (qcowrs: {}): {json}",
                passed.leaks
            ));
        }
        if let Some(exp) = &self.snapshot {
            let snap = self.dir.join("snap1.qcow2");
            let (c, out) =
                qemu_img(&["convert", "-l", "snapshot.name=snap1", "-O", "qcow2", &st, snap.to_str().unwrap()]);
            let (c2, out2) = qemu_img(&["compare", "-q", snap.to_str().unwrap(), exp.to_str().unwrap()]);
            if c != 0 || c2 != 0 {
                return Err(format!("snapshot snap1 changed: convert exit {c} {out}; compare exit {c2} {out2}"));
            }
        }
        let mem = Arc::new(MemStorage::new(passed.repaired.clone()));
        let mut h = QcowHeader::read_from(&*mem).map_err(|e| e.to_string())?;
        let raw = QcowRawFile::new(mem.clone(), h.cluster_size(), h.refcount_order, true).map_err(|e| e.to_string())?;
        let r = check_raw(&raw, &mut h, Repair::All, false).map_err(|e| format!("qcowrs repair=all: {e}"))?;
        let st = self.write("state-fixed.qcow2", &mem.to_vec());
        let (c, _, _, json) = qemu_check(Path::new(&st));
        if !r.is_clean() || c != 0 {
            return Err(format!("after qcowrs repair=all ({:?}): qemu-img check exit {c}: {json}", r.counts));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// The ops between two syncs: `log[d..e]`, in flight together; `log[e]` is a sync (or the end).
struct Segment {
    d: usize,
    e: usize,
    changed: HashMap<usize, Vec<u64>>,
    exhaustive: Option<Vec<Variant>>,
    /// States granted beyond the prefixes.
    give: usize,
}

fn segments(rec: &Recorded) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut durable = rec.base.clone();
    let mut d = 0;
    for e in 0..=rec.log.len() {
        if e < rec.log.len() && rec.log[e] != StorageOp::Sync {
            continue;
        }
        let pending: Vec<usize> = (d..e).collect();
        let changed: HashMap<usize, Vec<u64>> =
            pending.iter().map(|&i| (i, changed_sectors(&rec.log[i], &durable))).collect();
        let exhaustive = (pending.len() <= EXHAUSTIVE_OPS).then(|| exhaustive(&pending, &rec.log, &changed));
        for op in &rec.log[d..e] {
            apply(&mut durable, op, None, &mut BTreeSet::new());
        }
        out.push(Segment { d, e, changed, exhaustive, give: 0 });
        d = e + 1;
    }
    out
}

/// Shares the budget left after the prefixes: small segments get all they want, the rest an
/// equal share.
fn allocate(segs: &mut [Segment], budget: usize) {
    let prefixes: usize = segs.iter().map(|s| s.e - s.d + 1).sum();
    let mut left = budget.saturating_sub(prefixes);
    let want = |s: &Segment| s.exhaustive.as_ref().map_or(usize::MAX, Vec::len);
    let mut order: Vec<usize> = (0..segs.len()).collect();
    order.sort_by_key(|&i| want(&segs[i]));
    let n = order.len();
    for (k, &i) in order.iter().enumerate() {
        let give = want(&segs[i]).min(left / (n - k));
        segs[i].give = give;
        left -= give;
    }
}

/// The variants of a segment: its prefixes, then the exhaustive list if it fits the share,
/// else a sample (half from the exhaustive list, if any, half random, twice over for dupes).
fn variants(seg: &Segment, rng: &mut Rng) -> (Vec<Variant>, bool) {
    let pending: Vec<usize> = (seg.d..seg.e).collect();
    let mut out: Vec<Variant> = (0..=pending.len()).map(|p| whole(&pending[..p])).collect();
    if let Some(all) = seg.exhaustive.as_ref().filter(|a| a.len() <= seg.give) {
        out.extend(all.iter().cloned());
        return (out, true);
    }
    let mut pool = seg.exhaustive.clone().unwrap_or_default();
    rng.shuffle(&mut pool);
    let half = if pool.is_empty() { 0 } else { seg.give / 2 };
    out.extend(pool.into_iter().take(half));
    for _ in half..2 * seg.give {
        out.push(random_variant(rng, &pending, &seg.changed));
    }
    (out, false)
}

#[derive(Default)]
struct Summary {
    segments: usize,
    exhaustive: usize,
    states: usize,
    prefixes: usize,
    qemu: usize,
    failures: Vec<String>,
}

struct Run<'a> {
    rec: &'a Recorded,
    qemu: Qemu,
    /// Every this many states, one goes through qemu-img.
    qemu_every: usize,
    /// Print the first failures and save their states (not for the negative control).
    report: bool,
    tolerated: HashSet<ProblemKey>,
    s: Summary,
}

impl Run<'_> {
    fn fail(&mut self, what: String, state: &[u8]) {
        let n = self.s.failures.len();
        if n < 5 && self.report {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("crash-states");
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join(format!("{}-{n}.qcow2", self.rec.name));
            std::fs::write(&p, state).unwrap();
            let (_, _, _, json) = qemu_check(&p);
            eprintln!(
                "FAILED {} #{n} (state saved as {}):\n  {what}\n  qemu-img check: {json}",
                self.rec.name,
                p.display()
            );
        }
        self.s.failures.push(what);
    }

    fn one(&mut self, seg: &Segment, durable: &[u8], v: &Variant, bytes: Vec<u8>) {
        let qemu = self.s.states % self.qemu_every == 0 && self.s.qemu < qemu_cap();
        let pre = qemu.then(|| bytes.clone());
        let res = check_state(self.rec, seg.e, bytes, &self.tolerated);
        let res = match (res, pre) {
            (Ok(passed), Some(pre)) => {
                self.s.qemu += 1;
                self.qemu.sample(&pre, &passed)
            }
            (r, _) => r.map(|_| ()),
        };
        if let Err(e) = res {
            let what = format!("{}\n    {e}", describe_variant(self.rec, seg.d, seg.e, v));
            let (state, _) = build(durable, &self.rec.log, v);
            self.fail(what, &state);
        }
    }

    /// The completed operation: clean, no leaks either, every promise kept.
    fn completed(&mut self) {
        let all = qcowrs::replay(&self.rec.base, &self.rec.log).unwrap();
        match check_state(self.rec, self.rec.log.len(), all.clone(), &HashSet::new()) {
            Ok(p) if p.leaks == 0 || self.rec.may_leak => {}
            Ok(p) => self.fail(format!("the completed operation leaves {} leaked cluster(s)", p.leaks), &all),
            Err(e) => self.fail(format!("the completed operation: {e}"), &all),
        }
    }
}

/// Tries the crash states of a recorded operation; prints and returns the counts.
fn crash_states(rec: &Recorded, snapshot: bool) -> Summary {
    crash_states_within(rec, snapshot, budget(), true)
}

fn crash_states_within(rec: &Recorded, snapshot: bool, budget: usize, report: bool) -> Summary {
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    if std::env::var_os("QCOWRS_CRASH_LOG").is_some() {
        for (i, op) in rec.log.iter().enumerate() {
            eprintln!("{} {}", rec.name, rec.layout.describe(i, op));
        }
    }
    let mut segs = segments(rec);
    allocate(&mut segs, budget);
    let planned: usize = segs.iter().map(|s| s.e - s.d + 1 + s.give).sum();
    let mut run = Run {
        rec,
        qemu: Qemu::new(dir.path(), rec, snapshot),
        qemu_every: (planned / qemu_cap()).clamp(1, QEMU_EVERY),
        report,
        tolerated: base_problems(rec),
        s: Summary::default(),
    };
    let mut rng = Rng(rec.name.bytes().fold(0x5eed, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
    let mut durable = rec.base.clone();
    for seg in &segs {
        let (vars, exh) = variants(seg, &mut rng);
        run.s.segments += 1;
        run.s.exhaustive += usize::from(exh);
        run.s.prefixes += seg.e - seg.d + 1;
        let mut seen = HashSet::new();
        for v in &vars {
            if seen.len() >= seg.e - seg.d + 1 + seg.give {
                break;
            }
            let (bytes, key) = build(&durable, &rec.log, v);
            if seen.insert(key) {
                run.s.states += 1;
                run.one(seg, &durable, v, bytes);
            }
        }
        for op in &rec.log[seg.d..seg.e] {
            apply(&mut durable, op, None, &mut BTreeSet::new());
        }
    }
    run.completed();
    let s = run.s;
    let syncs = rec.log.iter().filter(|o| **o == StorageOp::Sync).count();
    eprintln!(
        "crash-states {}: log {} ops ({syncs} syncs), {} segments ({} exhaustive, {} sampled), {} distinct states (prefixes {}), {} checked with qemu-img, {} failure(s), {:.1}s",
        rec.name,
        rec.log.len(),
        s.segments,
        s.exhaustive,
        s.segments - s.exhaustive,
        s.states,
        s.prefixes,
        s.qemu,
        s.failures.len(),
        t.elapsed().as_secs_f64()
    );
    s
}

fn assert_safe(s: &Summary, name: &str) {
    assert!(s.failures.is_empty(), "{name}: {} crash state(s) failed; the first:\n{}", s.failures.len(), s.failures[0]);
}

// ---------------------------------------------------------------------------------------------
// Operations.

/// Bytes of guest write number `w` at guest offset `off`: every sector distinct and non-zero,
/// its first 16 bytes naming the write and the offset.
fn pattern(w: u64, off: u64, n: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..n).map(|j| (((off + j) / SECTOR + w * 7) % 251) as u8 | 1).collect();
    let mut s = off.div_ceil(SECTOR) * SECTOR;
    while s + 16 <= off + n {
        let i = (s - off) as usize;
        v[i..i + 8].copy_from_slice(&w.to_be_bytes());
        v[i + 8..i + 16].copy_from_slice(&s.to_be_bytes());
        s += SECTOR;
    }
    v
}

/// Seeded random guest writes into `targets` ((start, len) ranges), a flush every 1 to 3
/// writes, then close. A quarter of the writes are not sector aligned.
fn random_writes(ctx: &mut Ctx, seed: u64, targets: &[(u64, u64)], writes: u64, max_len: u64) {
    let mut rng = Rng(seed);
    let mut f = ctx.open();
    let size = f.virtual_size();
    let mut until_flush = 1 + rng.below(3);
    for w in 1..=writes {
        let (start, len) = targets[rng.below(targets.len() as u64) as usize];
        let (off, n) = if rng.chance(25) {
            (start + rng.below(len), 1 + rng.below(3000))
        } else {
            (start + rng.below(len / SECTOR) * SECTOR, (1 + rng.below(max_len / SECTOR)) * SECTOR)
        };
        let n = n.min(size - off);
        ctx.write(&mut f, off, &pattern(w, off, n));
        until_flush -= 1;
        if until_flush == 0 {
            ctx.flush(&mut f);
            until_flush = 1 + rng.below(3);
        }
    }
    ctx.close(f);
}

const M: u64 = 1 << 20;
const K: u64 = 1 << 10;

/// 64 KiB clusters, 1.5 GiB: L2 region 0 written before the snapshot (shared L2 and data),
/// region 1 after it (private), region 2 untouched.
fn base_64k(dir: &Path) -> Vec<u8> {
    qemu_base(
        dir,
        "base64k.qcow2",
        "cluster_size=65536",
        "1536M",
        &["write -P 0x11 0 256k", "write -P 0x12 1m 128k", "write -P 0x13 3m 64k"],
        Some(&["write -P 0x21 512m 192k", "write -P 0x22 600m 64k"]),
    )
}

/// 512 B clusters (an L2 table maps 32 KiB), 4 MiB, a snapshot.
fn base_512(dir: &Path) -> Vec<u8> {
    qemu_base(
        dir,
        "base512.qcow2",
        "cluster_size=512",
        "4M",
        &["write -P 0x11 0 20k", "write -P 0x12 100k 3k", "write -P 0x13 1m 8k"],
        Some(&["write -P 0x21 2m 16k", "write -P 0x22 3146240 1k"]),
    )
}

#[test]
fn write_workload_64k_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_64k(dir.path());
    let targets = [
        (0, 256 * K),                  // shared with the snapshot: COW of the L2 table and data
        (M, 128 * K),                  // shared
        (3 * M, 64 * K),               // shared
        (512 * M, 192 * K),            // private: in place
        (520 * M, 64 * M),             // unallocated, existing L2 table
        (1024 * M + 100 * M, 400 * M), // unallocated L2 region: a new L2 table
    ];
    let rec = record("write-64k", &base, |ctx| random_writes(ctx, 64, &targets, 14, 100 * K));
    assert_safe(&crash_states(&rec, true), "write-64k");
}

#[test]
fn write_workload_512b_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_512(dir.path());
    let targets = [(0, 20 * K), (100 * K, 3 * K), (M, 8 * K), (2 * M, 16 * K), (0, 4 * M)];
    let rec = record("write-512", &base, |ctx| random_writes(ctx, 512, &targets, 20, 6 * K));
    assert_safe(&crash_states(&rec, true), "write-512");
}

#[test]
fn write_zeroes_and_discard() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_64k(dir.path());
    let rec = record("zero-discard", &base, |ctx| {
        let mut f = ctx.open();
        ctx.write_zeroes(&mut f, 512 * M, 128 * K); // private whole clusters: zero flag, freed
        ctx.flush(&mut f);
        ctx.discard(&mut f, 0, 128 * K); // shared whole clusters: L2 COW, refcount 2 -> 1
        ctx.write_zeroes(&mut f, M + 4 * K, 8 * K); // partial shared cluster: COW with zeros
        ctx.flush(&mut f);
        ctx.discard(&mut f, 600 * M - 64 * K, 192 * K); // private cluster and unallocated ones
        ctx.write_zeroes(&mut f, 3 * M, 64 * K); // shared whole cluster
        ctx.discard(&mut f, 200 * K, 100 * K); // one whole shared cluster, partial edges kept
        ctx.flush(&mut f);
        ctx.discard(&mut f, M, 128 * K); // the cluster COWed above (now private) and a shared one
        ctx.close(f);
    });
    assert_safe(&crash_states(&rec, true), "zero-discard");
}

#[test]
fn truncate_moves_the_l1_table_512b_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "trunc512.qcow2",
        "cluster_size=512",
        "1M",
        &["write -P 0x11 0 8k"],
        Some(&["write -P 0x21 512k 4k"]),
    );
    let rec = record("truncate-512", &base, |ctx| {
        let mut f = ctx.open();
        let old_l1 = f.header().l1_table_offset;
        ctx.truncate(&mut f, 16 * M); // 32 L1 entries (1 cluster) -> 512 (8 clusters)
        assert_ne!(f.header().l1_table_offset, old_l1, "the L1 table did not move");
        ctx.write(&mut f, 12 * M, &pattern(1, 12 * M, 4 * K));
        ctx.write(&mut f, 100, &pattern(2, 100, 1000));
        ctx.close(f);
    });
    assert_safe(&crash_states(&rec, true), "truncate-512");
}

#[test]
fn truncate_moves_the_l1_table_64k_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "trunc64k.qcow2",
        "cluster_size=65536",
        "1G",
        &["write -P 0x11 0 128k"],
        Some(&["write -P 0x21 600m 64k"]),
    );
    let rec = record("truncate-64k", &base, |ctx| {
        let mut f = ctx.open();
        let old_l1 = f.header().l1_table_offset;
        ctx.truncate(&mut f, 3 * 1024 * M); // 2 L1 entries -> 6
        assert_ne!(f.header().l1_table_offset, old_l1, "the L1 table did not move");
        ctx.write(&mut f, 2560 * M, &pattern(1, 2560 * M, 70 * K));
        ctx.close(f);
    });
    assert_safe(&crash_states(&rec, true), "truncate-64k");
}

/// Cluster 0's refcount set to 0 (the refcounts are stale).
fn zero_cluster0_refcount(bytes: &[u8]) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new(bytes.to_vec()));
    let h = QcowHeader::read_from(&*mem).unwrap();
    let cs = h.cluster_size();
    let raw = QcowRawFile::new(mem.clone(), cs, h.refcount_order, true).unwrap();
    let rt = raw.read_u64_table(h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs / 8, "rt").unwrap();
    let rb = rt[0] & !(cs - 1);
    let mut block = raw.read_refcount_block(rb).unwrap();
    block[0] = 0;
    raw.write_refcount_block(rb, &block).unwrap();
    mem.to_vec()
}

#[test]
fn rebuild_of_stale_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "rebuild512.qcow2",
        "cluster_size=512",
        "2M",
        &["write -P 0x11 0 600k", "write -P 0x12 700k 20k"],
        Some(&["write -P 0x21 1m 300k", "write -P 0x22 10k 4k"]),
    );
    let base = zero_cluster0_refcount(&base);
    let rec = record("rebuild-512", &base, |ctx| {
        let opts = OpenOptions { writable: true, ..OpenOptions::default() };
        let mut f = QcowFile::open_storage(ctx.storage(), Path::new("<recorded>"), opts).unwrap();
        assert!(f.refcounts_stale());
        let r = f.rebuild_refcounts().unwrap();
        assert!(r.rebuilt && r.counts.corruptions == 0 && r.counts.check_errors == 0, "{r:?}");
        ctx.close(f);
    });
    assert_safe(&crash_states(&rec, true), "rebuild-512");
}

/// A leaked cluster (appended, refcount 1), a too-low refcount (a data cluster shared with the
/// snapshot, 2 -> 1) and a wrong OFLAG_COPIED (cleared on a private data cluster).
fn break_refcounts(bytes: &[u8]) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new(bytes.to_vec()));
    let h = QcowHeader::read_from(&*mem).unwrap();
    let cs = h.cluster_size();
    let raw = QcowRawFile::new(mem.clone(), cs, h.refcount_order, true).unwrap();
    let mask = 0x00ff_ffff_ffff_fe00u64;
    let rt = raw.read_u64_table(h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs / 8, "rt").unwrap();
    let rb = rt[0] & mask;
    let mut block = raw.read_refcount_block(rb).unwrap();
    let end = raw.file_len();
    raw.set_len(end + cs).unwrap();
    block[(end / cs) as usize] = 1;
    let l1 = raw.read_u64_table(h.l1_table_offset, u64::from(h.l1_size), "l1").unwrap();
    let t0 = raw.read_u64_table(l1[0] & mask, cs / 8, "l2").unwrap();
    let shared = (t0[0] & mask) / cs;
    assert_eq!(block[shared as usize], 2);
    block[shared as usize] = 1;
    raw.write_refcount_block(rb, &block).unwrap();
    let mut t1 = raw.read_u64_table(l1[1] & mask, cs / 8, "l2").unwrap();
    assert_ne!(t1[0] & (1 << 63), 0);
    t1[0] &= !(1 << 63);
    raw.write_u64_table(l1[1] & mask, &t1, "l2").unwrap();
    mem.to_vec()
}

#[test]
fn repair_of_leak_low_refcount_and_copied_flag() {
    let dir = tempfile::tempdir().unwrap();
    let base = break_refcounts(&base_64k(dir.path()));
    let rec = record("repair-64k", &base, |ctx| {
        let storage = ctx.storage();
        let mut h = QcowHeader::read_from(&*storage).unwrap();
        let raw = QcowRawFile::new(storage, h.cluster_size(), h.refcount_order, true).unwrap();
        let r = check_raw(&raw, &mut h, Repair::All, false).unwrap();
        assert!(r.is_clean() && r.counts.leaks_fixed == 1 && r.counts.corruptions_fixed >= 2, "{r:?}");
    });
    assert_safe(&crash_states(&rec, true), "repair-64k");
}

/// The harness must see a broken ordering: the same workload with the syncs between L2 tables
/// and the L1 entries that point at them removed (turned into empty writes) must fail.
#[test]
fn negative_control_l1_entries_not_ordered_after_l2_tables() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_64k(dir.path());
    let targets = [(0, 256 * K), (1024 * M, 400 * M)];
    let mut rec = record("control-64k", &base, |ctx| random_writes(ctx, 7, &targets, 6, 100 * K));
    let mut removed = 0;
    for i in 1..rec.log.len() {
        let after_l2 =
            matches!(&rec.log[i - 1], StorageOp::Write { offset, .. } if rec.layout.name(*offset).starts_with("L2"));
        if after_l2 && rec.log[i] == StorageOp::Sync {
            rec.log[i] = StorageOp::Write { offset: 0, data: Vec::new() };
            removed += 1;
        }
    }
    assert!(removed > 0);
    let s = crash_states_within(&rec, true, 400, false);
    eprintln!("negative control: {removed} syncs removed, {} of {} states fail", s.failures.len(), s.states);
    if let Some(f) = s.failures.first() {
        eprintln!("negative control, first failure: {f}");
    }
    assert!(!s.failures.is_empty(), "the harness did not notice L1 entries written before their L2 tables");
}

/// 512 B clusters with 64-bit refcounts (a refblock covers 64 clusters, one reftable cluster
/// 2 MiB of file): the writes need new refblocks and move the reftable.
#[test]
fn write_workload_grows_the_reftable() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "reft.qcow2",
        "cluster_size=512,refcount_bits=64",
        "8M",
        &["write -P 0x11 0 1900k"],
        Some(&["write -P 0x21 4m 8k"]),
    );
    let rt = |b: &[u8]| QcowHeader::read_from(&MemStorage::new(b.to_vec())).unwrap().refcount_table_offset;
    let targets = [(0, 1900 * K), (2 * M, 6 * M), (2 * M, 6 * M)];
    let rec = record("reftable-512", &base, |ctx| random_writes(ctx, 4096, &targets, 12, 60 * K));
    let after = qcowrs::replay(&base, &rec.log).unwrap();
    assert_ne!(rt(&base), rt(&after), "the reftable did not move");
    assert_safe(&crash_states(&rec, true), "reftable-512");
}

/// Extended L2 entries (subclusters of 2 KiB): writes allocate only the subclusters they
/// touch; write_zeroes sets zero bits.
#[test]
fn write_workload_extended_l2() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "ext.qcow2",
        "cluster_size=65536,extended_l2=on",
        "64M",
        &["write -P 0x11 0 8k", "write -P 0x12 100k 200k"],
        Some(&["write -P 0x21 1m 20k"]),
    );
    let rec = record("extended-l2", &base, |ctx| {
        let mut f = ctx.open();
        ctx.write(&mut f, M + 30 * K, &pattern(1, M + 30 * K, 5000)); // private cluster, new subclusters
        ctx.write(&mut f, 4 * K, &pattern(2, 4 * K, 3 * K)); // shared cluster: COW
        ctx.flush(&mut f);
        ctx.write_zeroes(&mut f, M + 2 * K, 10 * K); // zero bits on private subclusters
        ctx.write(&mut f, 9 * M + 1000, &pattern(3, 9 * M + 1000, 9000)); // unallocated cluster
        ctx.flush(&mut f);
        ctx.write_zeroes(&mut f, 9 * M + 4 * K, 2 * K);
        ctx.discard(&mut f, 128 * K, 64 * K);
        ctx.write(&mut f, M + 60 * K, &pattern(4, M + 60 * K, 8 * K)); // spans two clusters
        ctx.close(f);
    });
    assert_safe(&crash_states(&rec, true), "extended-l2");
}

/// Compressed clusters (written by QEMU), shared with a snapshot: overwritten partly (the
/// cluster is decompressed and rewritten), discarded, zeroed.
#[test]
fn writes_over_compressed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "comp.qcow2",
        "cluster_size=65536",
        "64M",
        &["write -c -P 0x11 0 64k", "write -c -P 0x12 64k 64k", "write -c -P 0x13 1m 128k"],
        Some(&["write -c -P 0x14 2m 64k", "write -c -P 0x15 3m 64k"]),
    );
    let rec = record("compressed", &base, |ctx| {
        let mut f = ctx.open();
        ctx.write(&mut f, 2 * M + 1000, &pattern(1, 2 * M + 1000, 3000)); // private compressed
        ctx.write(&mut f, 10 * K, &pattern(2, 10 * K, 4 * K)); // shared compressed
        ctx.flush(&mut f);
        ctx.discard(&mut f, 3 * M, 64 * K);
        ctx.write_zeroes(&mut f, M, 64 * K);
        ctx.write(&mut f, M + 64 * K + 512, &pattern(3, M + 64 * K + 512, 512));
        ctx.close(f);
    });
    assert_safe(&crash_states(&rec, true), "compressed");
}

/// What `convert -c` does to its new target: whole clusters written compressed, packed several
/// to a host cluster (byte-granular allocation, each host cluster's refcount counting the
/// compressed clusters in it), across an L2 table boundary, with a cluster that does not
/// compress stored plainly; then a write over a compressed cluster (copy on write).
#[test]
fn compressed_writes_of_a_convert() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(dir.path(), "conv.qcow2", "cluster_size=4096", "16M", &[], None);
    let rec = record("convert-compressed", &base, |ctx| {
        let mut f = ctx.open();
        let cs = 4 * K;
        let mut noise = 0x9e37_79b9_7f4a_7c15u64;
        for (i, c) in [0u64, 1, 2, 5, 511, 512, 513, 1000].iter().enumerate() {
            let mut data = pattern(i as u64 + 1, c * cs, cs);
            if i == 3 {
                for b in &mut data {
                    noise ^= noise << 13;
                    noise ^= noise >> 7;
                    noise ^= noise << 17;
                    *b = noise as u8; // incompressible: stored plainly
                }
            } else {
                data[..cs as usize / 2].fill(i as u8); // compresses to a few hundred bytes
            }
            ctx.write_compressed(&mut f, c * cs, &data);
            if i == 4 {
                ctx.flush(&mut f);
            }
        }
        ctx.write(&mut f, cs + 100, &pattern(9, cs + 100, 200)); // over a compressed cluster
        ctx.close(f);
    });
    assert_safe(&crash_states(&rec, false), "convert-compressed");
}

/// A mixed workload: writes (shared, private, new L2), write_zeroes and discard, with flushes.
fn mixed_workload(ctx: &mut Ctx) {
    let mut f = ctx.open();
    ctx.write(&mut f, 100 * K, &pattern(1, 100 * K, 70 * K)); // shared: COW of L2 and data
    ctx.write(&mut f, 512 * M + 8 * K, &pattern(2, 512 * M + 8 * K, 4 * K)); // private
    ctx.flush(&mut f);
    ctx.write(&mut f, 1100 * M, &pattern(3, 1100 * M, 64 * K)); // new L2 table
    ctx.discard(&mut f, 0, 64 * K); // shared
    ctx.flush(&mut f);
    ctx.write_zeroes(&mut f, 512 * M + 64 * K, 64 * K); // private
    ctx.discard(&mut f, 600 * M, 64 * K); // private
    ctx.write(&mut f, 3 * M + 512, &pattern(4, 3 * M + 512, 1024)); // shared
    ctx.close(f);
}

/// Lazy refcounts: the first write sets the dirty bit, close clears it.
#[test]
fn mixed_workload_lazy_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "lazy.qcow2",
        "cluster_size=65536,lazy_refcounts=on",
        "1536M",
        &["write -P 0x11 0 256k", "write -P 0x13 3m 64k"],
        Some(&["write -P 0x21 512m 192k", "write -P 0x22 600m 64k"]),
    );
    let rec = record("lazy-refcounts", &base, mixed_workload);
    assert_safe(&crash_states(&rec, true), "lazy-refcounts");
}

/// Version 2 (compat=0.10): no zero flag (discard and write_zeroes deallocate) and no dirty bit.
#[test]
fn mixed_workload_v2() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "v2.qcow2",
        "cluster_size=65536,compat=0.10",
        "1536M",
        &["write -P 0x11 0 256k", "write -P 0x13 3m 64k"],
        Some(&["write -P 0x21 512m 192k", "write -P 0x22 600m 64k"]),
    );
    let rec = record("v2", &base, mixed_workload);
    assert_safe(&crash_states(&rec, true), "v2");
}

/// A persistent dirty bitmap: flagged in use by the first write, updated and unflagged on close.
#[test]
fn mixed_workload_persistent_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    qemu_base(
        dir.path(),
        "bitmap.qcow2",
        "cluster_size=65536",
        "1536M",
        &["write -P 0x11 0 256k", "write -P 0x13 3m 64k"],
        Some(&["write -P 0x21 512m 192k", "write -P 0x22 600m 64k"]),
    );
    let p = dir.path().join("bitmap.qcow2");
    let (c, out) = qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "b0"]);
    assert_eq!(c, 0, "{out}");
    let base = std::fs::read(&p).unwrap();
    let rec = record("bitmap", &base, mixed_workload);
    assert_safe(&crash_states(&rec, true), "bitmap");
}

/// `qemu-img bitmap` actions (`ops::bitmap::bitmap_storage`) on an image with a snapshot and a
/// persistent bitmap that QEMU set bits in: the guest content never changes, and every state
/// opens, checks clean but for leaks, and keeps the snapshot (checked with qemu-img too).
fn bitmap_actions(name: &str, actions: &[(&str, BitmapAction)]) {
    let dir = tempfile::tempdir().unwrap();
    let file = format!("{name}.qcow2");
    qemu_base(
        dir.path(),
        &file,
        "cluster_size=65536",
        "256M",
        &["write -P 0x11 0 256k", "write -c -P 0x12 1M 64k"],
        Some(&["write -P 0x21 8m 192k"]),
    );
    let p = dir.path().join(&file);
    let (c, out) = qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "b0"]);
    assert_eq!(c, 0, "{out}");
    let (c, out) =
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x31 64m 1m", p.to_str().unwrap()]));
    assert_eq!(c, 0, "{out}");
    let base = std::fs::read(&p).unwrap();
    let rec = record(name, &base, |ctx| {
        let st = ctx.storage();
        for (bitmap, action) in actions {
            qcowrs::bitmap_storage(&st, Path::new("<recorded>"), bitmap, action).unwrap();
            let _ = ctx.pos();
        }
    });
    assert!(rec.log.iter().any(|op| matches!(op, StorageOp::Sync)), "{name}: nothing recorded");
    assert_safe(&crash_states(&rec, true), name);
}

#[test]
fn bitmap_add_and_merge() {
    bitmap_actions(
        "bitmap-add-merge",
        &[("b1", BitmapAction::Add { granularity: Some(65536) }), ("b1", BitmapAction::Merge { source: "b0".into() })],
    );
}

#[test]
fn bitmap_clear_disable_remove() {
    bitmap_actions(
        "bitmap-clear-remove",
        &[("b0", BitmapAction::Clear), ("b0", BitmapAction::Disable), ("b0", BitmapAction::Remove)],
    );
}

/// A data cluster shared by the snapshot and the (private, copied) active L2 table, whose
/// refcount lost the snapshot's reference (2 -> 1) and whose active entry has OFLAG_COPIED set
/// to match: the repair raises the refcount and clears the flag.
fn lose_snapshot_reference(bytes: &[u8]) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new(bytes.to_vec()));
    let h = QcowHeader::read_from(&*mem).unwrap();
    let cs = h.cluster_size();
    let raw = QcowRawFile::new(mem.clone(), cs, h.refcount_order, true).unwrap();
    let mask = 0x00ff_ffff_ffff_fe00u64;
    let rt = raw.read_u64_table(h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs / 8, "rt").unwrap();
    let mut block = raw.read_refcount_block(rt[0] & mask).unwrap();
    let l1 = raw.read_u64_table(h.l1_table_offset, u64::from(h.l1_size), "l1").unwrap();
    assert_ne!(l1[0] & (1 << 63), 0, "the active L2 table is not private");
    let mut t = raw.read_u64_table(l1[0] & mask, cs / 8, "l2").unwrap();
    let shared = (t[0] & mask) / cs;
    assert_eq!((block[shared as usize], t[0] >> 63), (2, 0));
    block[shared as usize] = 1;
    raw.write_refcount_block(rt[0] & mask, &block).unwrap();
    t[0] |= 1 << 63;
    raw.write_u64_table(l1[0] & mask, &t, "l2").unwrap();
    mem.to_vec()
}

// A too-low refcount and the OFLAG_COPIED flag that goes with it are repaired in place
// (refblock write, L2 table write, one sync at the end). No order of the two writes is safe on
// its own, so the repair sets the dirty bit first: a crash between them leaves an image that
// open(rebuild=True) repairs again. (Found by this harness; fixed in check.rs.)
#[test]
fn repair_of_lost_snapshot_reference() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "lost.qcow2",
        "cluster_size=65536",
        "64M",
        &["write -P 0x11 0 256k"],
        Some(&["write -P 0x21 5m 64k"]),
    );
    let base = lose_snapshot_reference(&base);
    let rec = record("repair-lost-ref", &base, |ctx| {
        let storage = ctx.storage();
        let mut h = QcowHeader::read_from(&*storage).unwrap();
        let raw = QcowRawFile::new(storage, h.cluster_size(), h.refcount_order, true).unwrap();
        let r = check_raw(&raw, &mut h, Repair::All, false).unwrap();
        assert!(r.is_clean() && r.counts.corruptions_fixed >= 2, "{r:?}");
    });
    assert_safe(&crash_states(&rec, true), "repair-lost-ref");
}

#[test]
fn rebuild_of_stale_refcounts_64k_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = zero_cluster0_refcount(&base_64k(dir.path()));
    let rec = record("rebuild-64k", &base, |ctx| {
        let storage = ctx.storage();
        let mut h = QcowHeader::read_from(&*storage).unwrap();
        let raw = QcowRawFile::new(storage, h.cluster_size(), h.refcount_order, true).unwrap();
        let r = check_raw(&raw, &mut h, Repair::All, true).unwrap();
        assert!(r.rebuilt && r.is_clean(), "{r:?}");
    });
    assert_safe(&crash_states(&rec, true), "rebuild-64k");
}

/// The seed's entry point: a new refcount structure only (no dirty bit, no leak or
/// OFLAG_COPIED repair); the old structure is left leaked.
#[test]
fn seed_rebuild_refcounts_function() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "seed512.qcow2",
        "cluster_size=512",
        "2M",
        &["write -P 0x11 0 300k"],
        Some(&["write -P 0x21 1m 100k", "write -P 0x22 10k 4k"]),
    );
    let base = zero_cluster0_refcount(&base);
    let mut rec = record("seed-rebuild-512", &base, |ctx| {
        let storage = ctx.storage();
        let mut h = QcowHeader::read_from(&*storage).unwrap();
        let raw = QcowRawFile::new(storage, h.cluster_size(), h.refcount_order, true).unwrap();
        qcowrs::rebuild_refcounts(&raw, &mut h).unwrap();
    });
    rec.may_leak = true; // the old structure, by the seed's contract
    assert_safe(&crash_states(&rec, true), "seed-rebuild-512");
}

/// Points a header field (a big-endian u64 at `at`) elsewhere.
fn poke_u64(bytes: &[u8], at: usize, value: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + 8].copy_from_slice(&value.to_be_bytes());
    b
}

fn structural_repair(ctx: &Ctx) -> qcowrs::CheckReport {
    let storage = ctx.storage();
    let mut h = QcowHeader::read_for_check(&*storage).unwrap();
    let raw = QcowRawFile::new(storage, h.cluster_size(), h.refcount_order, true).unwrap();
    let r = check_raw(&raw, &mut h, Repair::All, false).unwrap();
    assert!(r.is_clean() && !r.dropped.is_empty(), "{r:?}");
    r
}

/// Structural repair (issue 8): a snapshot whose L1 table lies past the end of the file is
/// dropped (a new snapshot table written, then the header switched to it), its clusters freed.
#[test]
fn repair_drops_a_snapshot_with_its_l1_table_past_eof() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "snapdrop.qcow2",
        "cluster_size=65536",
        "64M",
        &["write -P 0x11 0 256k"],
        Some(&["write -P 0x21 5m 64k"]),
    );
    let mem = Arc::new(MemStorage::new(base.clone()));
    let h = QcowHeader::read_from(&*mem).unwrap();
    // The entry's first field is its L1 table offset.
    let base = poke_u64(&base, h.snapshots_offset as usize, 1 << 40);
    let rec = record("repair-snapshot-drop", &base, |ctx| {
        structural_repair(ctx);
    });
    assert_safe(&crash_states(&rec, false), "repair-snapshot-drop");
}

/// Structural repair (issue 8): the active L1 table pointed past the end of the file is
/// recreated (as QEMU reads it: all zeros) at the end of the file and the header switched.
#[test]
fn repair_recreates_an_l1_table_past_eof() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(dir.path(), "l1eof.qcow2", "cluster_size=65536", "64M", &["write -P 0x11 0 256k"], None);
    let size = QcowHeader::read_from(&*Arc::new(MemStorage::new(base.clone()))).unwrap().size;
    // l1_table_offset is the header's u64 at 40.
    let base = poke_u64(&base, 40, 1 << 28);
    let rec = record_with_disk("repair-l1-past-eof", &base, (Disk::default(), size), |ctx| {
        structural_repair(ctx);
    });
    assert_safe(&crash_states(&rec, false), "repair-l1-past-eof");
}

// ---------------------------------------------------------------------------------------------
// Image operations: resize --shrink, rebase, commit.

impl Ctx {
    /// `qemu-img resize --shrink` on the open image: the virtual size drops to `size`; the
    /// first `size` bytes keep their content (every state reads the old content at the old
    /// size or its truncated view at the new one: `check_guest` reads only below the size).
    fn shrink(&mut self, f: &mut QcowFile, size: u64) {
        let p = self.pos();
        let new = qcowrs::ops::resize::resize_image(f, qcowrs::ops::resize::NewSize::Absolute(size), true).unwrap();
        assert_eq!((new, f.virtual_size()), (size, size));
        self.model.size = size;
        self.model.sizes.push((p, size));
        let p = self.pos();
        self.model.promise(p);
    }
}

/// `resize --shrink` with 64 KiB clusters, data before and past the new end, the new end
/// inside an L2 table (its entries past the end cleared) and a whole table past it (unlinked,
/// freed), then close.
#[test]
fn shrink_64k_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "shrink64k.qcow2",
        "cluster_size=65536",
        "1536M",
        &["write -P 0x11 0 256k", "write -P 0x12 512m 192k", "write -P 0x13 600m 128k", "write -P 0x14 1100m 64k"],
        None,
    );
    let rec = record("shrink-64k", &base, |ctx| {
        let mut f = ctx.open();
        ctx.shrink(&mut f, 512 * M + 100 * K); // inside the cluster at 512m+64k
        ctx.close(f);
    });
    let mut rec = rec;
    rec.regrow = Some(rec.model.promises[0].size);
    assert_safe(&crash_states(&rec, false), "shrink-64k");
}

/// `resize --shrink` with 512 B clusters (an L2 table maps 32 KiB): many tables past the end.
#[test]
fn shrink_512b_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "shrink512.qcow2",
        "cluster_size=512",
        "4M",
        &["write -P 0x11 0 20k", "write -P 0x12 1m 40k", "write -P 0x13 2m 16k", "write -P 0x14 3146240 1k"],
        None,
    );
    let rec = record("shrink-512", &base, |ctx| {
        let mut f = ctx.open();
        ctx.shrink(&mut f, M + 7 * K + 512); // inside an L2 table, data past it
        ctx.close(f);
    });
    let mut rec = rec;
    rec.regrow = Some(rec.model.promises[0].size);
    assert_safe(&crash_states(&rec, false), "shrink-512");
}

/// `resize --shrink` of an image with an internal snapshot: tables and clusters it shares lose
/// only the active tree's reference; the snapshot keeps its size and content.
#[test]
fn shrink_with_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_64k(dir.path());
    let rec = record("shrink-snapshot", &base, |ctx| {
        let mut f = ctx.open();
        ctx.write(&mut f, 1200 * M, &pattern(1, 1200 * M, 64 * K)); // a private table past the end
        ctx.flush(&mut f);
        ctx.shrink(&mut f, 520 * M);
        ctx.close(f);
    });
    let mut rec = rec;
    rec.regrow = Some(rec.model.promises[0].size);
    assert_safe(&crash_states(&rec, true), "shrink-snapshot");
}

/// Safe rebase (`qemu-img rebase -b NEW -F qcow2`, or `-b ""`) of the overlay `overlay` (its
/// header names `old` by absolute path, so every state finds the backing file it names):
/// recorded on the overlay; the backing files are read-only inputs on disk. Every state must
/// open with the backing file its header names (old or new) and read the guest content the
/// overlay had before: the copies are durable before the header changes.
fn record_rebase(name: &str, dir: &Path, overlay: &[u8], new: Option<&Path>, files: &[&Path]) -> Recorded {
    let mut watch = Vec::new();
    for f in files {
        watch.extend(allocated_ranges(&std::fs::read(f).unwrap()));
    }
    let chain = guest_disk_of(&open_mem(overlay.to_vec(), OpenOptions::default()).unwrap(), &watch);
    let path = dir.join("overlay.qcow2");
    let mut rec = record_with_disk(name, overlay, chain, |ctx| {
        let opts = OpenOptions { writable: true, ..OpenOptions::default() };
        let mut f = QcowFile::open_storage(ctx.storage(), &path, opts).unwrap();
        let image = new.map(|p| BackingImage::qcow2(QcowFile::open_read_only(p).unwrap()));
        let opts = qcowrs::ops::rebase::RebaseOptions {
            backing_file: new.map_or(String::new(), |p| p.to_str().unwrap().to_string()),
            backing_format: new.map(|_| "qcow2".to_string()),
            unsafe_mode: false,
        };
        qcowrs::ops::rebase::rebase_image(&mut f, image.as_ref(), &opts, &|_, _| Ok(())).unwrap();
        assert_eq!(f.header().backing_file.as_deref(), new.map(|p| p.to_str().unwrap()));
        ctx.close(f);
    });
    rec.watch = watch;
    rec
}

/// Two backing files that agree in places and differ in others (data only in one, data in
/// both that differs, data equal in both), and an overlay over the first that shadows some
/// of it (whole clusters and part of one).
fn rebase_files(dir: &Path, cluster: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let old = dir.join("old.qcow2");
    let new = dir.join("new-base.qcow2");
    let opts = format!("cluster_size={cluster}");
    qemu_base(
        dir,
        "old.qcow2",
        &opts,
        "16M",
        &["write -P 0x11 0 256k", "write -P 0x12 1m 128k", "write -P 0x13 4m 64k", "write -P 0x14 6m 8k"],
        None,
    );
    qemu_base(
        dir,
        "new-base.qcow2",
        &opts,
        "16M",
        &[
            "write -P 0x11 0 128k",
            "write -P 0x55 128k 64k",
            "write -P 0x12 1m 64k",
            "write -P 0x66 8m 64k",
            "write -P 0x14 6m 4k",
        ],
        None,
    );
    let ov_opts = format!("{opts},backing_file={},backing_fmt=qcow2", old.display());
    let overlay = qemu_base(
        dir,
        "overlay.qcow2",
        &ov_opts,
        "16M",
        &["write -P 0x77 4m 64k", "write -P 0x78 132k 4k", "write -P 0x79 10m 4k"],
        None,
    );
    (old, new, overlay)
}

#[test]
fn rebase_onto_another_backing_file_64k() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new, overlay) = rebase_files(dir.path(), "65536");
    let rec = record_rebase("rebase-64k", dir.path(), &overlay, Some(&new), &[&old, &new]);
    assert_safe(&crash_states(&rec, false), "rebase-64k");
}

#[test]
fn rebase_onto_none_4k() {
    let dir = tempfile::tempdir().unwrap();
    let (old, _, overlay) = rebase_files(dir.path(), "4096");
    let rec = record_rebase("rebase-none-4k", dir.path(), &overlay, None, &[&old]);
    assert_safe(&crash_states(&rec, false), "rebase-none-4k");
}

/// The header area of this overlay (QEMU wrote a feature name table) spans two sectors and
/// shrinks by the backing format extension: the extensions after it move across sectors.
#[test]
fn rebase_onto_none_64k() {
    let dir = tempfile::tempdir().unwrap();
    let (old, _, overlay) = rebase_files(dir.path(), "65536");
    let rec = record_rebase("rebase-none-64k", dir.path(), &overlay, None, &[&old]);
    assert_safe(&crash_states(&rec, false), "rebase-none-64k");
}

/// A standalone image (64 KiB clusters, QEMU's feature name table) put onto a backing file:
/// where the new backing file has data and the image none, zeros are copied in; the header
/// area grows past its first sector (the backing name lands in the second).
#[test]
fn rebase_standalone_onto_a_backing_file_64k() {
    let dir = tempfile::tempdir().unwrap();
    let (_, new, _) = rebase_files(dir.path(), "65536");
    let image = qemu_base(
        dir.path(),
        "alone.qcow2",
        "cluster_size=65536",
        "16M",
        &["write -P 0x31 64k 128k", "write -P 0x32 8m 4k"],
        None,
    );
    let rec = record_rebase("rebase-standalone-64k", dir.path(), &image, Some(&new), &[&new]);
    assert_safe(&crash_states(&rec, false), "rebase-standalone-64k");
}

/// A file of an operation that writes several: its writes, syncs, resizes and punches go to
/// a log shared with the other files, tagged with the file, so the order between files shows.
#[derive(Debug)]
struct SharedLog {
    rec: RecordingStorage,
    tag: usize,
    log: Arc<std::sync::Mutex<Vec<(usize, StorageOp)>>>,
}

impl SharedLog {
    fn note(&self) {
        let mut log = self.log.lock().unwrap();
        log.extend(self.rec.take_log().into_iter().map(|op| (self.tag, op)));
    }
}

impl Storage for SharedLog {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.rec.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.rec.write_at(buf, offset)?;
        self.note();
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        self.rec.sync()?;
        self.note();
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.rec.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.rec.set_len(len)?;
        self.note();
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.rec.punch_hole(offset, len)?;
        self.note();
        Ok(())
    }
}

/// The recorded phase of one file of a multi-file operation: its own log, its guest model.
fn phase(name: &str, base: &[u8], log: Vec<StorageOp>, model: Model) -> Recorded {
    let mut layout = Layout::default();
    layout.add(base);
    layout.add(&qcowrs::replay(base, &log).unwrap());
    Recorded {
        name: name.to_string(),
        base: base.to_vec(),
        log,
        model,
        layout,
        may_leak: false,
        below: None,
        watch: Vec::new(),
        above: None,
        regrow: None,
        either: None,
    }
}

/// The model of a file whose guest content goes from `old` to `new` with no promise between:
/// every sector reads its old or its new content, the size is the old or the new one.
fn old_or_new(old: (Disk, u64), new: &(Disk, u64), end: usize) -> Model {
    let mut m = Model::new(old.0, old.1);
    let sectors: BTreeSet<u64> = m.cur.0.keys().chain(new.0 .0.keys()).copied().collect();
    for s in sectors {
        if m.cur.get(s) != new.0.get(s) {
            let data: Arc<[u8]> = new.0.get(s).into();
            m.writes.push(SectorWrite { issue: 0, sector: s, data });
        }
    }
    if new.1 != m.size {
        m.sizes.push((0, new.1));
    }
    m.cur = new.0.clone();
    m.size = new.1;
    m.promise(end);
    m
}

/// `qemu-img commit` of `overlay` (its header names `base` by absolute path) into `base`
/// (qcow2), both on storages that log into one shared log; returns the two phases.
///
/// What a commit promises, and so what every crash state must keep:
///
/// * The guest content of the chain (the overlay over the base) never changes: the commit
///   copies into the base only ranges the overlay allocates (so the overlay still shadows
///   them), and empties the overlay only once the base holds them durably.
/// * The base's own content changes (as with qemu-img, whose commit rewrites the base): after
///   a crash each of its sectors reads its old or its new content (and the size, if it grew,
///   is the old or the new one): there is no flush promise in between. Other overlays of the
///   base see that mix; qemu-img's commit invalidates them as well.
/// * Internal snapshots of the base keep their content (checked with qemu-img on a sample).
///
/// The two files are written one after the other: `commit_images` closes and syncs the base
/// before its first write to the overlay, and this is checked on the shared log (every base
/// op before every overlay op, the last base op a sync). A sync of one file makes only that
/// file's writes durable; with that order, at any crash point at most one file has writes in
/// flight: while the base is written the overlay is as it was, and once the overlay is touched
/// the base is durable in its final state. So the states of the pair are exactly the base's
/// crash states under the original overlay, then the overlay's crash states over the final
/// base: each phase is replayed as a file of its own (`above`: the overlay read over every
/// base state; `below`: the final base under every overlay state).
fn record_commit(name: &str, base: &[u8], overlay: &[u8]) -> (Recorded, Recorded) {
    let mut watch = allocated_ranges(base);
    watch.extend(allocated_ranges(overlay));
    let over = |b: &[u8]| {
        let mem = Arc::new(MemStorage::new(overlay.to_vec()));
        QcowFile::open_storage_with_backing(
            mem,
            Path::new("<overlay>"),
            OpenOptions::default(),
            Some(mem_backing(b).unwrap()),
        )
        .unwrap()
    };
    let chain = guest_disk_of(&over(base), &watch);
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let file = |bytes: &[u8], tag: usize| -> Arc<dyn Storage> {
        let rec = RecordingStorage::new(Arc::new(MemStorage::new(bytes.to_vec())));
        Arc::new(SharedLog { rec, tag, log: log.clone() })
    };
    let (base_st, top_st) = (file(base, 0), file(overlay, 1));
    let opts = OpenOptions { writable: true, backing: qcowrs::BackingChoice::Disabled, ..OpenOptions::default() };
    let mut top = QcowFile::open_storage(top_st, Path::new("<overlay>"), opts.clone()).unwrap();
    let base_f = QcowFile::open_storage(base_st, Path::new("<base>"), opts).unwrap();
    let target = qcowrs::ops::commit::CommitBase::Qcow2(Box::new(base_f));
    qcowrs::ops::commit::commit_images(&over(base), 1, target, Some(&mut top), &|_, _| Ok(())).unwrap();
    top.close().unwrap();
    drop(top);
    let log = std::mem::take(&mut *log.lock().unwrap());
    let first_top = log.iter().position(|(t, _)| *t == 1).unwrap_or(log.len());
    assert!(log[first_top..].iter().all(|(t, _)| *t == 1), "{name}: the base is written after the overlay is touched");
    assert_eq!(
        log[..first_top].last().map(|(_, op)| op),
        Some(&StorageOp::Sync),
        "{name}: the base is not synced last"
    );
    let (base_log, top_log): (Vec<StorageOp>, Vec<StorageOp>) = (
        log[..first_top].iter().map(|(_, op)| op.clone()).collect(),
        log[first_top..].iter().map(|(_, op)| op.clone()).collect(),
    );
    let final_base = qcowrs::replay(base, &base_log).unwrap();
    let final_top = qcowrs::replay(overlay, &top_log).unwrap();
    assert!(allocated_ranges(&final_top).is_empty(), "{name}: the overlay is not empty");
    let new = guest_disk_of(&open_mem(final_base.clone(), OpenOptions::default()).unwrap(), &watch);
    let old = guest_disk_of(&open_mem(base.to_vec(), OpenOptions::default()).unwrap(), &watch);
    let n = base_log.len();
    let mut b = phase(&format!("{name}-base"), base, base_log, old_or_new(old, &new, n));
    b.above = Some((overlay.to_vec(), chain.0.clone()));
    b.watch = watch.clone();
    let size = chain.1;
    let mut m = Model::new(chain.0, size);
    m.promise(top_log.len());
    let mut t = phase(&format!("{name}-overlay"), overlay, top_log, m);
    t.below = Some(final_base);
    t.watch = watch;
    (b, t)
}

/// Commit with 64 KiB clusters: the overlay (larger than the base, so the base grows first)
/// holds data over the base's data and past its end, zeros over its data, and a partly
/// written cluster; the base has an internal snapshot sharing its clusters (the commit's
/// writes into the base copy them).
#[test]
fn commit_into_a_qcow2_base_64k() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "base.qcow2",
        "cluster_size=65536",
        "8M",
        &["write -P 0x11 0 256k", "write -P 0x12 1m 128k"],
        Some(&["write -P 0x13 3m 64k"]),
    );
    let opts = format!("cluster_size=65536,backing_file={},backing_fmt=qcow2", dir.path().join("base.qcow2").display());
    let overlay = qemu_base(
        dir.path(),
        "overlay.qcow2",
        &opts,
        "12M",
        &[
            "write -P 0x21 64k 64k",
            "write -z 1m 64k",
            "write -P 0x22 3m 8k",
            "write -P 0x23 10m 128k",
            "write -P 0x24 5m 4k",
        ],
        None,
    );
    let (b, t) = record_commit("commit-64k", &base, &overlay);
    assert_safe(&crash_states(&b, true), "commit-64k-base");
    assert_safe(&crash_states(&t, false), "commit-64k-overlay");
}

/// Commit with 512 B clusters (many L2 tables in both files, the base's refcount structure
/// grows).
#[test]
fn commit_into_a_qcow2_base_512b() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "base.qcow2",
        "cluster_size=512",
        "2M",
        &["write -P 0x11 0 20k", "write -P 0x12 1m 8k"],
        None,
    );
    let opts = format!("cluster_size=512,backing_file={},backing_fmt=qcow2", dir.path().join("base.qcow2").display());
    let overlay = qemu_base(
        dir.path(),
        "overlay.qcow2",
        &opts,
        "2M",
        &["write -P 0x21 4k 6k", "write -z 1m 2k", "write -P 0x22 1536k 40k", "write -P 0x23 100k 1000"],
        None,
    );
    let (b, t) = record_commit("commit-512", &base, &overlay);
    assert_safe(&crash_states(&b, false), "commit-512-base");
    assert_safe(&crash_states(&t, false), "commit-512-overlay");
}

// ---------------------------------------------------------------------------------------------
// amend: compat, refcount_bits (the guest content never changes).

impl Ctx {
    /// `qemu-img amend` on the recorded image.
    fn amend(&mut self, opts: &qcowrs::ops::amend::AmendOptions) {
        let _ = self.pos();
        let storage = self.storage();
        qcowrs::ops::amend::amend_storage(&storage, Path::new("<recorded>"), opts, &|_, _| Ok(())).unwrap();
        let p = self.pos();
        self.model.promise(p);
    }
}

fn amend_opts(compat: Option<&str>, refcount_bits: Option<u64>) -> qcowrs::ops::amend::AmendOptions {
    qcowrs::ops::amend::AmendOptions {
        compat: compat.map(str::to_string),
        refcount_bits,
        ..qcowrs::ops::amend::AmendOptions::default()
    }
}

/// `compat=0.10`: preallocated and plain zero clusters in the active tables and in a
/// snapshot's expanded table by table, then the header rewritten as v2.
#[test]
fn amend_downgrade_with_zero_clusters_and_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "amend-down.qcow2",
        "cluster_size=65536",
        "64M",
        &["write -P 0x11 0 512k", "write -z 64k 128k", "write -z 8M 256k"],
        Some(&["write -P 0x12 256k 64k", "write -z 320k 64k", "write -z 9M 64k"]),
    );
    let rec = record("amend-downgrade", &base, |ctx| ctx.amend(&amend_opts(Some("0.10"), None)));
    assert_safe(&crash_states(&rec, true), "amend-downgrade");
}

/// `compat=1.1` on a v2 image with a snapshot (its entry gets v3's extra data: a new
/// snapshot table, then the header rewritten as v3).
#[test]
fn amend_upgrade_with_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "amend-up.qcow2",
        "compat=0.10",
        "64M",
        &["write -P 0x21 0 192k"],
        Some(&["write -P 0x22 64k 64k"]),
    );
    let rec = record("amend-upgrade", &base, |ctx| ctx.amend(&amend_opts(Some("1.1"), None)));
    assert_safe(&crash_states(&rec, true), "amend-upgrade");
}

/// `refcount_bits=4` with 512 B clusters (many refblocks): the new structure is written
/// beside the old one and one header write switches to it.
#[test]
fn amend_refcount_width_512b_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "amend-rc.qcow2",
        "cluster_size=512",
        "8M",
        &["write -P 0x31 0 300k", "write -P 0x32 4M 200k"],
        None,
    );
    let rec = record("amend-refcount-bits", &base, |ctx| ctx.amend(&amend_opts(None, Some(4))));
    assert_safe(&crash_states(&rec, false), "amend-refcount-bits");
}

// ---------------------------------------------------------------------------------------------
// Internal snapshots: apply (the whole guest content replaced: old or new, never a mix;
// `Recorded::either`), create and delete (the active disk never changes; the base's own
// snapshot keeps its content, checked with qemu-img).

fn snapshot_op(name: &str, op: impl Fn(&mut QcowFile)) {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        &format!("{name}.qcow2"),
        "cluster_size=65536",
        "64M",
        &["write -P 0x71 0 256k", "write -c -P 0x72 1M 128k", "write -z 2M 128k"],
        Some(&["write -P 0x73 64k 64k", "write -P 0x74 8M 64k"]),
    );
    let rec = record(name, &base, |ctx| {
        let mut f = ctx.open();
        let _ = ctx.pos();
        op(&mut f);
        ctx.close(f);
    });
    assert_safe(&crash_states(&rec, true), name);
}

/// Applying the base's snapshot: the active disk (written after the snapshot) is replaced by
/// the snapshot's content. Every crash state reads wholly one or the other.
#[test]
fn snapshot_apply() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(
        dir.path(),
        "snapshot-apply.qcow2",
        "cluster_size=65536",
        "64M",
        &["write -P 0x71 0 256k", "write -c -P 0x72 1M 128k", "write -z 2M 128k"],
        Some(&["write -P 0x73 64k 64k", "write -P 0x74 8M 64k", "write -z 1M 64k"]),
    );
    let mut rec = record("snapshot-apply", &base, |ctx| {
        let mut f = ctx.open();
        let _ = ctx.pos();
        f.apply_snapshot("snap1").unwrap();
        ctx.close(f);
    });
    let snap =
        open_mem(base.clone(), OpenOptions { snapshot: Some("snap1".into()), ..OpenOptions::default() }).unwrap();
    let new = guest_disk_of(&snap, &[]);
    assert!(new.0 .0 != guest_disk(&base).0 .0, "the snapshot must differ from the active disk");
    rec.either = Some(new);
    assert_safe(&crash_states(&rec, true), "snapshot-apply");
}

#[test]
fn snapshot_create() {
    snapshot_op("snapshot-create", |f| {
        f.create_snapshot("new").unwrap();
    });
}

#[test]
fn snapshot_delete() {
    // The base's snapshot is the only one: deleting it is checked by the active content and
    // the refcounts (the harness compares snap1 only while it exists).
    snapshot_op("snapshot-create-delete", |f| {
        f.create_snapshot("new").unwrap();
        f.delete_snapshot("new").unwrap();
    });
}
