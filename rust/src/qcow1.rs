//! qcow version 1 images, read-only (QEMU's `block/qcow.c` format, which QEMU, libqcow and The
//! Sleuth Kit still read).
//!
//! A 48-byte big-endian header (`magic` "QFI\xfb", `version` 1, `backing_file_offset`,
//! `backing_file_size`, `mtime`, `size`, `cluster_bits`, `l2_bits`, padding, `crypt_method`,
//! `l1_table_offset`), an L1 table of `ceil(size / (cluster_size << l2_bits))` entries naming
//! L2 tables of `1 << l2_bits` entries. An L2 entry is 0 (unallocated: the backing file, or
//! zeros), a host offset (plain data), or, with bit 63 set, a compressed cluster: a raw
//! deflate stream of `(entry >> (63 - cluster_bits)) & (cluster_size - 1)` bytes at
//! `entry & ((1 << (63 - cluster_bits)) - 1)`. No refcounts, no snapshots; encrypted images
//! (`crypt_method` 1, AES-CBC) are refused.
//!
//! The header is checked as `qcow_open` checks it (same limits, same order), then against the
//! file: the L1 table and the backing file name must lie inside it. Where QEMU reads zeros
//! past the end of the file (an L2 table, a data cluster, a compressed stream), qcowrs reports
//! the truncation instead, as it does for qcow2: QEMU itself always writes whole tables,
//! whole clusters and whole compressed streams, so only a damaged file has them past its end.
//!
//! [`Qcow1File`] is a [`BackingRead`] (so it can be the backing file of a qcow2 image, and a
//! source of `convert`), reads with `&self` from several threads, and answers block status
//! ([`Qcow1File::run`]) for `map`, `convert`, `measure` and `compare`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::backing::{BackingKind, BackingRead, FileId};
use crate::error::{Error, IoContext, Result};
use crate::format::QCOW_MAGIC;
use crate::storage::Storage;

/// The only version of the format.
pub const QCOW1_VERSION: u32 = 1;
/// Bytes of the header.
pub const QCOW1_HEADER_LEN: usize = 48;
/// `qcow_open`: clusters of 512 B to 64 KiB.
const MIN_CLUSTER_BITS: u8 = 9;
const MAX_CLUSTER_BITS: u8 = 16;
/// `qcow_open`: L2 tables of 512 B to 64 KiB (`l2_bits` counts 8-byte entries).
const MIN_L2_BITS: u8 = 9 - 3;
const MAX_L2_BITS: u8 = 16 - 3;
/// `qcow_open`: the L1 table holds at most `INT_MAX / 8` entries.
const MAX_L1_ENTRIES: u64 = (i32::MAX as u64) / 8;
/// `qcow_open`: "Backing file name too long".
const MAX_BACKING_NAME: u32 = 1023;
/// `crypt_method` values.
const CRYPT_NONE: u32 = 0;
const CRYPT_AES: u32 = 1;
/// L2 entry bit 63: a compressed cluster.
const OFLAG_COMPRESSED: u64 = 1 << 63;
/// L2 tables kept per open image (QEMU's `L2_CACHE_SIZE`).
const L2_CACHE: usize = 16;
/// Decompressed clusters kept per open image (partial reads of one cluster).
const DECOMPRESSED_CACHE: usize = 4;

/// Offsets of the header fields (for messages).
pub mod field_offset {
    /// `version` (u32).
    pub const VERSION: u64 = 4;
    /// `backing_file_offset` (u64).
    pub const BACKING_FILE_OFFSET: u64 = 8;
    /// `backing_file_size` (u32).
    pub const BACKING_FILE_SIZE: u64 = 16;
    /// `mtime` (u32).
    pub const MTIME: u64 = 20;
    /// `size` (u64).
    pub const SIZE: u64 = 24;
    /// `cluster_bits` (u8).
    pub const CLUSTER_BITS: u64 = 32;
    /// `l2_bits` (u8).
    pub const L2_BITS: u64 = 33;
    /// `crypt_method` (u32).
    pub const CRYPT_METHOD: u64 = 36;
    /// `l1_table_offset` (u64).
    pub const L1_TABLE_OFFSET: u64 = 40;
}
use field_offset as fo;

fn be32(b: &[u8], at: u64) -> u32 {
    let at = usize::try_from(at).unwrap_or(0);
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = usize::try_from(at).unwrap_or(0);
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Whether `head` (the first bytes of a file) starts a qcow version 1 image (QEMU's
/// `qcow_probe`).
pub(crate) fn is_qcow1(head: &[u8]) -> bool {
    head.len() >= 8 && be32(head, 0) == QCOW_MAGIC && be32(head, fo::VERSION) == QCOW1_VERSION
}

/// The header of a qcow version 1 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow1Header {
    /// Where the backing file name lies (0: none).
    pub backing_file_offset: u64,
    /// Bytes of the backing file name.
    pub backing_file_size: u32,
    /// Modification time of the backing file (informational).
    pub mtime: u32,
    /// Virtual size in bytes, as stored (QEMU uses whole sectors of it).
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u8,
    /// log2 of the entries of an L2 table.
    pub l2_bits: u8,
    /// 0: none, 1: AES-CBC (refused when opening for reading).
    pub crypt_method: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// The backing file name, read from the file (None: no backing file).
    pub backing_file: Option<String>,
}

impl Qcow1Header {
    /// Parses and checks the 48 header bytes as `qcow_open` does, in its order (an encrypted
    /// image parses: [`Qcow1Header::check_readable`] refuses it). The backing file name is
    /// not read here.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < 4 || be32(b, 0) != QCOW_MAGIC {
            return Err(Error::InvalidMagic("not a qcow image: field 'magic' at 0x0 is not \"QFI\\xfb\"".into()));
        }
        if b.len() < QCOW1_HEADER_LEN {
            return Err(Error::corrupt(
                format!("qcow header truncated: {} bytes, the header needs {QCOW1_HEADER_LEN}", b.len()),
                0,
            ));
        }
        let version = be32(b, fo::VERSION);
        if version != QCOW1_VERSION {
            return Err(Error::UnsupportedFeature(format!(
                "qcow version {version} (field 'version' at header offset 0x4): the qcow driver reads version 1; versions 2 and 3 are qcow2"
            )));
        }
        let h = Qcow1Header {
            backing_file_offset: be64(b, fo::BACKING_FILE_OFFSET),
            backing_file_size: be32(b, fo::BACKING_FILE_SIZE),
            mtime: be32(b, fo::MTIME),
            size: be64(b, fo::SIZE),
            cluster_bits: b[usize::try_from(fo::CLUSTER_BITS).unwrap_or(0)],
            l2_bits: b[usize::try_from(fo::L2_BITS).unwrap_or(0)],
            crypt_method: be32(b, fo::CRYPT_METHOD),
            l1_table_offset: be64(b, fo::L1_TABLE_OFFSET),
            backing_file: None,
        };
        h.check_fields()?;
        Ok(h)
    }

    fn check_fields(&self) -> Result<()> {
        if self.size <= 1 {
            return Err(Error::corrupt(
                format!("field 'size' at header offset 0x18 is {}: the image size must be at least 2 bytes", self.size),
                fo::SIZE,
            ));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Error::InvalidClusterSize(format!(
                "field 'cluster_bits' at header offset 0x20 is {}; qcow clusters are 512 B to 64 KiB ({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})",
                self.cluster_bits
            )));
        }
        if !(MIN_L2_BITS..=MAX_L2_BITS).contains(&self.l2_bits) {
            return Err(Error::corrupt(
                format!(
                    "field 'l2_bits' at header offset 0x21 is {}; qcow L2 tables are 512 B to 64 KiB ({MIN_L2_BITS}..{MAX_L2_BITS})",
                    self.l2_bits
                ),
                fo::L2_BITS,
            ));
        }
        if self.crypt_method > CRYPT_AES {
            return Err(Error::corrupt(
                format!(
                    "field 'crypt_method' at header offset 0x24 is {}: invalid encryption method (0 none, 1 AES)",
                    self.crypt_method
                ),
                fo::CRYPT_METHOD,
            ));
        }
        let shift = u32::from(self.cluster_bits) + u32::from(self.l2_bits);
        let entries = self.size.div_ceil(1u64 << shift);
        if self.size > u64::MAX - (1u64 << shift) || entries > MAX_L1_ENTRIES {
            return Err(Error::corrupt(
                format!(
                    "field 'size' at header offset 0x18 is {}: image too large (more than {MAX_L1_ENTRIES} L1 entries)",
                    self.size
                ),
                fo::SIZE,
            ));
        }
        Ok(())
    }

    /// Refuses what qcowrs cannot read: encrypted images.
    pub fn check_readable(&self) -> Result<()> {
        if self.crypt_method != CRYPT_NONE {
            return Err(Error::UnsupportedFeature(format!(
                "encrypted qcow image (field 'crypt_method' at header offset 0x24 is {}, AES-CBC): qcowrs does not decrypt; decrypt it with qemu-img convert first",
                self.crypt_method
            )));
        }
        Ok(())
    }

    /// Reads the header and the backing file name from `file` (which must lie inside it),
    /// without looking at the L1 table: what `info` describes.
    pub fn read_lenient(file: &dyn Storage) -> Result<Self> {
        let file_len = file.len().ctx(|| "reading the image file's length".to_string())?;
        let mut b = vec![0u8; usize::try_from(file_len.min(QCOW1_HEADER_LEN as u64)).unwrap_or(0)];
        read_exact(file, &mut b, 0, "reading the qcow header at 0x0")?;
        let mut h = Self::parse(&b)?;
        h.backing_file = h.read_backing_name(file, file_len)?;
        Ok(h)
    }

    /// Reads the header and the backing file name from `file`, checked against the file's
    /// length (the L1 table and the name must lie inside it).
    pub fn read_from(file: &dyn Storage) -> Result<Self> {
        let file_len = file.len().ctx(|| "reading the image file's length".to_string())?;
        let mut b = vec![0u8; usize::try_from(file_len.min(QCOW1_HEADER_LEN as u64)).unwrap_or(0)];
        read_exact(file, &mut b, 0, "reading the qcow header at 0x0")?;
        let mut h = Self::parse(&b)?;
        let l1_end = h.l1_entries().checked_mul(8).and_then(|n| n.checked_add(h.l1_table_offset));
        if l1_end.is_none_or(|e| e > file_len) {
            return Err(Error::offset(
                format!("L1 table ({} entries, field 'l1_table_offset' at header offset 0x28)", h.l1_entries()),
                h.l1_table_offset,
                format!("lies past the end of the file (0x{file_len:x}); the image is truncated or damaged"),
            ));
        }
        h.backing_file = h.read_backing_name(file, file_len)?;
        Ok(h)
    }

    fn read_backing_name(&self, file: &dyn Storage, file_len: u64) -> Result<Option<String>> {
        if self.backing_file_offset == 0 {
            return Ok(None);
        }
        let len = self.backing_file_size;
        if len > MAX_BACKING_NAME {
            return Err(Error::corrupt(
                format!(
                    "field 'backing_file_size' at header offset 0x10 is {len}: backing file name too long (at most {MAX_BACKING_NAME} bytes)"
                ),
                fo::BACKING_FILE_SIZE,
            ));
        }
        if self.backing_file_offset.checked_add(u64::from(len)).is_none_or(|e| e > file_len) {
            return Err(Error::offset(
                format!("backing file name ({len} bytes, field 'backing_file_offset' at header offset 0x8)"),
                self.backing_file_offset,
                format!("lies past the end of the file (0x{file_len:x})"),
            ));
        }
        let mut name = vec![0u8; len as usize];
        read_exact(file, &mut name, self.backing_file_offset, "reading the backing file name")?;
        // QEMU keeps the name as a C string: it ends at the first NUL.
        if let Some(nul) = name.iter().position(|&c| c == 0) {
            name.truncate(nul);
        }
        if name.is_empty() {
            return Ok(None);
        }
        String::from_utf8(name).map(Some).map_err(|_| {
            Error::corrupt(
                "the backing file name (field 'backing_file_offset' at header offset 0x8) is not UTF-8",
                self.backing_file_offset,
            )
        })
    }

    /// Bytes of a cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries of an L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Entries of the L1 table.
    pub fn l1_entries(&self) -> u64 {
        self.size.div_ceil(1u64 << (u32::from(self.cluster_bits) + u32::from(self.l2_bits)))
    }

    /// The guest size QEMU shows: whole sectors of `size`.
    pub fn virtual_size(&self) -> u64 {
        self.size / 512 * 512
    }
}

fn read_exact(file: &dyn Storage, buf: &mut [u8], at: u64, what: &str) -> Result<()> {
    let n = file.read_at(buf, at).ctx(|| what.to_string())?;
    if n < buf.len() {
        return Err(Error::corrupt(format!("{what}: the file ends after {n} of {} bytes", buf.len()), at));
    }
    Ok(())
}

/// What a run of guest clusters holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Qcow1State {
    /// Nothing: the backing file's data, or zeros.
    Unallocated,
    /// Plain data at this host offset (of the run's start).
    Data {
        /// Host offset of the run's first byte.
        host: u64,
    },
    /// One compressed cluster.
    Compressed {
        /// Host offset of the stream.
        host: u64,
        /// Bytes of the stream.
        len: u64,
    },
}

/// A qcow version 1 image opened read-only, with its backing file.
pub struct Qcow1File {
    storage: Arc<dyn Storage>,
    header: Qcow1Header,
    path: PathBuf,
    file_len: u64,
    l1: Vec<u64>,
    /// Recently read L2 tables: (host offset, entries).
    l2_cache: Mutex<VecDeque<(u64, Arc<Vec<u64>>)>>,
    /// Recently decompressed clusters: (host offset of the stream, contents).
    decompressed: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    backing: Option<Box<dyn BackingRead>>,
}

impl std::fmt::Debug for Qcow1File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow1File").field("path", &self.path).field("size", &self.header.size).finish_non_exhaustive()
    }
}

impl Qcow1File {
    /// Opens the image on `storage` (already locked if it is a file) without a backing file;
    /// `path` names it in messages.
    pub fn open_storage(storage: Arc<dyn Storage>, path: &Path) -> Result<Self> {
        let header = Qcow1Header::read_from(&*storage)?;
        header.check_readable()?;
        let file_len = storage.len().ctx(|| format!("reading the length of '{}'", path.display()))?;
        // Inside the file (checked by `read_from`), so proportional to its size.
        let mut raw = vec![0u8; usize::try_from(header.l1_entries() * 8).unwrap_or(0)];
        read_exact(&*storage, &mut raw, header.l1_table_offset, "reading the L1 table")?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(Qcow1File {
            storage,
            header,
            path: path.to_path_buf(),
            file_len,
            l1,
            l2_cache: Mutex::new(VecDeque::new()),
            decompressed: Mutex::new(VecDeque::new()),
            backing: None,
        })
    }

    /// Opens the image and the backing file its header names (`chain`: the identities of the
    /// images above it, for the loop check).
    pub(crate) fn open_in_chain(
        storage: Arc<dyn Storage>,
        path: &Path,
        chain: &[FileId],
        force_share: bool,
    ) -> Result<Self> {
        let mut f = Self::open_storage(Arc::clone(&storage), path)?;
        if let Some(name) = f.header.backing_file.clone() {
            let mut chain = chain.to_vec();
            chain.extend(crate::backing::file_id(&*storage));
            // A qcow header names no backing format: it is probed, as QEMU probes it.
            f.backing = Some(crate::backing::open_backing(path, &name, None, &chain, force_share)?);
        }
        Ok(f)
    }

    /// Replaces the backing file (None: what it would supply reads as zeros).
    pub fn set_backing(&mut self, backing: Option<crate::backing::BackingImage>) {
        self.backing = backing.map(|b| b.0);
    }

    /// The header.
    pub fn header(&self) -> &Qcow1Header {
        &self.header
    }

    /// The image's path as opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The guest size (whole sectors of the header's `size`).
    pub fn virtual_size(&self) -> u64 {
        self.header.virtual_size()
    }

    /// The file holding the image.
    pub(crate) fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Length of the image file when opened.
    pub(crate) fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The backing file, if any.
    pub(crate) fn backing_file(&self) -> Option<&dyn BackingRead> {
        self.backing.as_deref()
    }

    /// The L2 table at `offset` (named by L1[`index`]), from the cache or read whole.
    fn l2_table(&self, index: u64, offset: u64) -> Result<Arc<Vec<u64>>> {
        let lock = || self.l2_cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, t)) = lock().iter().find(|(o, _)| *o == offset) {
            return Ok(Arc::clone(t));
        }
        let bytes = self.header.l2_entries() * 8;
        if offset.checked_add(bytes).is_none_or(|e| e > self.file_len) {
            return Err(Error::offset(
                format!("L2 table (L1[{index}] at 0x{:x})", self.header.l1_table_offset + index * 8),
                offset,
                format!("lies (partly) past the end of the file (0x{:x}); the image is truncated", self.file_len),
            ));
        }
        let mut raw = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
        read_exact(&*self.storage, &mut raw, offset, &format!("reading the L2 table at 0x{offset:x}"))?;
        let t: Arc<Vec<u64>> = Arc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect());
        let mut c = lock();
        if c.len() >= L2_CACHE {
            c.pop_front();
        }
        c.push_back((offset, Arc::clone(&t)));
        Ok(t)
    }

    /// Classifies the L2 entry at `at` (host offset, for messages).
    fn classify(&self, entry: u64, at: u64) -> Result<Qcow1State> {
        if entry == 0 {
            return Ok(Qcow1State::Unallocated);
        }
        let cb = u32::from(self.header.cluster_bits);
        if entry & OFLAG_COMPRESSED != 0 {
            let host = entry & ((1u64 << (63 - cb)) - 1);
            let len = (entry >> (63 - cb)) & (self.header.cluster_size() - 1);
            if host.checked_add(len).is_none_or(|e| e > self.file_len) || len == 0 {
                return Err(Error::corrupt(
                    format!(
                        "L2 entry 0x{entry:x}: compressed cluster of 0x{len:x} bytes at 0x{host:x} lies past the end of the file (0x{:x}) or is empty",
                        self.file_len
                    ),
                    at,
                ));
            }
            return Ok(Qcow1State::Compressed { host, len });
        }
        if entry % 512 != 0 {
            return Err(Error::corrupt(format!("L2 entry 0x{entry:x}: data cluster offset is not sector aligned"), at));
        }
        Ok(Qcow1State::Data { host: entry })
    }

    /// The state at guest offset `off` (below the virtual size) and where its run ends (at
    /// most `end`): plain data runs while host clusters follow each other, unallocated runs
    /// across empty L2 entries and empty L1 entries; a compressed cluster is one run. Never
    /// past the end of the L2 table that holds `off`, except across empty L1 entries.
    pub(crate) fn run(&self, off: u64, end: u64) -> Result<(Qcow1State, u64)> {
        let cs = self.header.cluster_size();
        let span = cs << self.header.l2_bits;
        let end = end.min(self.virtual_size());
        let mut l1_index = off / span;
        let l2_offset = self.l1.get(usize::try_from(l1_index).unwrap_or(usize::MAX)).copied().unwrap_or(0);
        if l2_offset == 0 {
            while let Some(&0) = self.l1.get(usize::try_from(l1_index + 1).unwrap_or(usize::MAX)) {
                l1_index += 1;
            }
            return Ok((Qcow1State::Unallocated, end.min((l1_index + 1).saturating_mul(span))));
        }
        let table = self.l2_table(l1_index, l2_offset)?;
        let first = (off % span) / cs;
        let at = |i: u64| l2_offset + i * 8;
        let state = self.classify(table[usize::try_from(first).unwrap_or(0)], at(first))?;
        let table_end = end.min((l1_index + 1).saturating_mul(span));
        let mut run_end = (off / cs + 1) * cs;
        if let Qcow1State::Compressed { .. } = state {
            return Ok((state, run_end.min(end)));
        }
        let mut i = first + 1;
        while run_end < table_end {
            // A bad entry ends the run; it is refused when that cluster is read.
            let Ok(next) = self.classify(table[usize::try_from(i).unwrap_or(0)], at(i)) else { break };
            let same = match (state, next) {
                (Qcow1State::Unallocated, Qcow1State::Unallocated) => true,
                (Qcow1State::Data { host: h0 }, Qcow1State::Data { host }) => host == h0 + (i - first) * cs,
                _ => false,
            };
            if !same {
                break;
            }
            run_end += cs;
            i += 1;
        }
        let state = match state {
            Qcow1State::Data { host } => Qcow1State::Data { host: host + off % cs },
            s => s,
        };
        Ok((state, run_end.min(end)))
    }

    /// Reads guest data at `offset` (zeros past the virtual size are not returned: the count
    /// read is).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let size = self.virtual_size();
        if offset >= size {
            return Ok(0);
        }
        let len = usize::try_from(size - offset).unwrap_or(usize::MAX).min(buf.len());
        let mut done = 0usize;
        while done < len {
            let off = offset + done as u64;
            let (state, run_end) = self.run(off, offset + len as u64)?;
            let n = usize::try_from(run_end - off).unwrap_or(0);
            let chunk = &mut buf[done..done + n];
            match state {
                Qcow1State::Unallocated => match &self.backing {
                    Some(b) => b.read_into(chunk, off)?,
                    None => chunk.fill(0),
                },
                Qcow1State::Data { host } => self.read_data(chunk, host, off)?,
                Qcow1State::Compressed { host, len } => self.read_compressed(chunk, host, len, off)?,
            }
            done += n;
        }
        Ok(len)
    }

    fn read_data(&self, chunk: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let n = self
            .storage
            .read_at(chunk, host)
            .ctx(|| format!("reading data at 0x{host:x} of '{}'", self.path.display()))?;
        if n < chunk.len() {
            return Err(Error::corrupt(
                format!(
                    "data for guest offset 0x{:x} lies past the end of the file (0x{:x}); the image is truncated",
                    guest + n as u64,
                    self.file_len
                ),
                host + n as u64,
            ));
        }
        Ok(())
    }

    fn decompress_into(&self, out: &mut [u8], host: u64, clen: u64, guest: u64) -> Result<()> {
        // `clen` is below the cluster size (at most 64 KiB) and inside the file.
        let mut input = vec![0u8; usize::try_from(clen).unwrap_or(0)];
        read_exact(&*self.storage, &mut input, host, &format!("reading the compressed cluster at 0x{host:x}"))?;
        crate::compression::decompress(0, &input, out).map_err(|why| {
            Error::corrupt(
                format!(
                    "compressed cluster for guest offset 0x{guest:x} (0x{clen:x} bytes) cannot be decompressed: {why}"
                ),
                host,
            )
        })
    }

    fn read_compressed(&self, chunk: &mut [u8], host: u64, clen: u64, guest: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        let in_cluster = usize::try_from(guest % cs).unwrap_or(0);
        if in_cluster == 0 && chunk.len() as u64 == cs {
            return self.decompress_into(chunk, host, clen, guest);
        }
        let lock = || self.decompressed.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = lock().iter().find(|(h, _)| *h == host).map(|(_, v)| Arc::clone(v));
        let data = if let Some(d) = hit {
            d
        } else {
            let mut out = vec![0u8; usize::try_from(cs).unwrap_or(0)];
            self.decompress_into(&mut out, host, clen, guest - guest % cs)?;
            let d = Arc::new(out);
            let mut c = lock();
            if c.len() >= DECOMPRESSED_CACHE {
                c.pop_front();
            }
            c.push_back((host, Arc::clone(&d)));
            d
        };
        chunk.copy_from_slice(&data[in_cluster..in_cluster + chunk.len()]);
        Ok(())
    }
}

impl BackingRead for Qcow1File {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at(buf, offset)?;
        buf[n..].fill(0);
        Ok(())
    }
    fn kind(&self) -> BackingKind<'_> {
        BackingKind::Qcow1(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// A 1 MiB image (4 KiB clusters, 512-entry L2 tables), L1 at 48: one entry.
    fn header(size: u64, cluster_bits: u8, l2_bits: u8, crypt: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(QCOW1_HEADER_LEN);
        h.extend_from_slice(&QCOW_MAGIC.to_be_bytes());
        h.extend_from_slice(&1u32.to_be_bytes());
        h.extend_from_slice(&0u64.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes());
        h.extend_from_slice(&size.to_be_bytes());
        h.extend_from_slice(&[cluster_bits, l2_bits, 0, 0]);
        h.extend_from_slice(&crypt.to_be_bytes());
        h.extend_from_slice(&48u64.to_be_bytes());
        h
    }

    /// An image of 1 MiB: header, L1 (1 entry) at 48, L2 at 4096, data clusters after it.
    fn image() -> Vec<u8> {
        let mut f = header(1 << 20, 12, 9, 0);
        f.extend_from_slice(&4096u64.to_be_bytes());
        f.resize(4096, 0);
        let mut l2 = vec![0u8; 4096];
        // Guest cluster 1 at host 8192, cluster 2 at 12288 (contiguous), cluster 5 compressed.
        l2[8..16].copy_from_slice(&8192u64.to_be_bytes());
        l2[16..24].copy_from_slice(&12288u64.to_be_bytes());
        let data = vec![0xabu8; 4096];
        let stream = crate::compression::compress(0, &data, 4095).unwrap();
        let host = 16384u64;
        let entry = OFLAG_COMPRESSED | (stream.len() as u64) << (63 - 12) | host;
        l2[40..48].copy_from_slice(&entry.to_be_bytes());
        f.extend_from_slice(&l2);
        f.extend_from_slice(&[1u8; 4096]);
        f.extend_from_slice(&[2u8; 4096]);
        f.extend_from_slice(&stream);
        f
    }

    fn open(bytes: Vec<u8>) -> Result<Qcow1File> {
        let mem = Arc::new(MemStorage::default());
        mem.write_at(&bytes, 0).unwrap();
        Qcow1File::open_storage(mem, Path::new("t.qcow"))
    }

    #[test]
    fn reads_plain_compressed_and_unallocated() {
        let f = open(image()).unwrap();
        assert_eq!(f.virtual_size(), 1 << 20);
        let mut buf = vec![0xffu8; 6 * 4096];
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), buf.len());
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 1));
        assert!(buf[8192..12288].iter().all(|&b| b == 2));
        assert!(buf[12288..20480].iter().all(|&b| b == 0));
        assert!(buf[20480..].iter().all(|&b| b == 0xab));
        let mut part = [0u8; 100];
        f.read_at(&mut part, 5 * 4096 + 7).unwrap();
        assert!(part.iter().all(|&b| b == 0xab));
        // Runs: data merges across contiguous host clusters, compressed stands alone.
        assert_eq!(f.run(4096, 1 << 20).unwrap(), (Qcow1State::Data { host: 8192 }, 12288));
        assert_eq!(f.run(0, 1 << 20).unwrap(), (Qcow1State::Unallocated, 4096));
        assert!(matches!(f.run(20480, 1 << 20).unwrap(), (Qcow1State::Compressed { host: 16384, .. }, 24576)));
        assert_eq!(f.run(24576, 1 << 20).unwrap(), (Qcow1State::Unallocated, 1 << 20));
    }

    #[test]
    fn refusals_name_the_field() {
        let patched = |at: usize, v: &[u8]| {
            let mut b = image();
            b[at..at + v.len()].copy_from_slice(v);
            open(b).unwrap_err()
        };
        let e = patched(32, &[30]);
        assert!(matches!(e, Error::InvalidClusterSize(_)) && e.to_string().contains("cluster_bits"), "{e}");
        let e = patched(33, &[14]);
        assert!(e.to_string().contains("l2_bits"), "{e}");
        let e = patched(36, &1u32.to_be_bytes());
        assert!(matches!(e, Error::UnsupportedFeature(_)) && e.to_string().contains("crypt_method"), "{e}");
        let e = patched(36, &2u32.to_be_bytes());
        assert!(matches!(e, Error::CorruptImage { .. }) && e.to_string().contains("crypt_method"), "{e}");
        let e = patched(24, &1u64.to_be_bytes());
        assert!(e.to_string().contains("'size'"), "{e}");
        let e = patched(24, &(u64::MAX - 10).to_be_bytes());
        assert!(e.to_string().contains("too large"), "{e}");
        let e = patched(40, &(1u64 << 40).to_be_bytes());
        assert!(matches!(e, Error::InvalidOffset { .. }) && e.to_string().contains("l1_table_offset"), "{e}");
        let e = patched(4, &2u32.to_be_bytes());
        assert!(e.to_string().contains("version"), "{e}");
        let e = patched(0, b"XXXX");
        assert!(matches!(e, Error::InvalidMagic(_)));
        // A backing name too long, and one past the end of the file.
        let mut b = image();
        b[8..16].copy_from_slice(&48u64.to_be_bytes());
        b[16..20].copy_from_slice(&1024u32.to_be_bytes());
        assert!(open(b.clone()).unwrap_err().to_string().contains("backing_file_size"));
        b[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[16..20].copy_from_slice(&10u32.to_be_bytes());
        assert!(open(b).unwrap_err().to_string().contains("backing_file_offset"));
        // A truncated header.
        assert!(matches!(open(image()[..40].to_vec()).unwrap_err(), Error::CorruptImage { .. }));
    }

    #[test]
    fn tables_and_clusters_past_eof_are_errors() {
        let mut b = image();
        // The L2 table past the end of the file.
        b[48..56].copy_from_slice(&(1u64 << 32).to_be_bytes());
        let f = open(b).unwrap();
        let e = f.read_at(&mut [0u8; 512], 0).unwrap_err();
        assert!(e.to_string().contains("L2 table (L1[0]"), "{e}");
        // A compressed stream longer than what the file holds.
        let mut b = image();
        let entry = OFLAG_COMPRESSED | 4000u64 << (63 - 12) | 16384;
        b[4096 + 40..4096 + 48].copy_from_slice(&entry.to_be_bytes());
        let f = open(b).unwrap();
        let e = f.read_at(&mut [0u8; 512], 5 * 4096).unwrap_err();
        assert!(e.to_string().contains("compressed cluster"), "{e}");
        // A data cluster cut by the end of the file.
        let mut b = image();
        b.truncate(8192 + 100);
        let f = open(b).unwrap();
        let e = f.read_at(&mut [0u8; 4096], 4096).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn a_huge_size_allocates_nothing_before_the_file_check() {
        // 2^48 bytes with 512 B clusters and 64-entry L2 tables: 2^33 L1 entries, refused;
        // 2^40 bytes: 2^25 entries (256 MiB of L1) that the file does not hold, refused.
        let mut b = image();
        b[32] = 9;
        b[33] = 6;
        b[24..32].copy_from_slice(&(1u64 << 48).to_be_bytes());
        assert!(open(b.clone()).unwrap_err().to_string().contains("too large"));
        b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(open(b).unwrap_err(), Error::InvalidOffset { .. }));
    }
}
