//! The transmission phase. One thread reads the connection's requests in order; reads and
//! block-status queries go to [`WORKERS`] threads of the connection, so that a client keeping
//! several requests in flight (nbdcopy, qemu) has them served in parallel while the next ones
//! are read. Every other request (write, flush, trim, write-zeroes, disconnect) first waits
//! until no read is in flight, then runs on the reading thread: a write never races a read of
//! the same connection, and a flush covers every write answered before it. Reads of several
//! connections run in parallel too; writes take the image's write lock.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Condvar, Mutex, PoisonError, RwLock};

use super::handshake::{Session, BASE_ALLOCATION_ID};
use super::proto::{
    End, Put, Replies, Wire, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH,
    CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, EIO, ENOSPC, EPERM, REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_MAGIC,
};
use super::MAX_PAYLOAD;
use crate::error::Error;
use crate::qcow_file::QcowFile;

/// Threads answering one connection's reads.
const WORKERS: usize = 4;
/// Reads queued for them before the reading thread waits.
const QUEUED: usize = 16;

/// Granularity at which a structured read reply sends zeros as holes.
const HOLE_GRANULE: usize = 4096;
/// Largest buffer of zeros written for `NBD_CMD_WRITE_ZEROES` with `NBD_CMD_FLAG_NO_HOLE`.
const ZERO_CHUNK: u64 = 1 << 20;

/// The served image, shared by every connection.
pub struct Image {
    /// The open image: reads share the lock, changes take it exclusively.
    pub file: RwLock<QcowFile>,
    /// Virtual size.
    pub size: u64,
    /// Opened read-write.
    pub writable: bool,
}

/// One request's header.
#[derive(Clone, Copy, Debug)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

/// An NBD error number for an error of the image.
fn errno(e: &Error) -> u32 {
    match e {
        Error::ReadOnlyImage(_) => EPERM,
        Error::InvalidArgument(_) | Error::InvalidOffset { .. } => EINVAL,
        Error::Io { source, .. } if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => ENOSPC,
        _ => EIO,
    }
}

/// What the connection did to the image since its last flush.
#[derive(Debug, Default)]
pub struct Dirty(pub bool);

/// The reads of a connection in flight (queued or being answered), and how the first failed
/// answer ended the connection.
#[derive(Default)]
struct InFlight {
    state: Mutex<(usize, Option<End>)>,
    idle: Condvar,
}

impl InFlight {
    fn start(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).0 += 1;
    }
    fn done(&self, result: Result<(), End>) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.0 -= 1;
        if let (Err(e), None) = (result, &st.1) {
            st.1 = Some(e);
        }
        if st.0 == 0 {
            self.idle.notify_all();
        }
    }
    /// How an answer ended the connection, if one did.
    fn failure(&self) -> Result<(), End> {
        match self.state.lock().unwrap_or_else(PoisonError::into_inner).1.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
    /// Waits until no read is in flight.
    fn wait_idle(&self) -> Result<(), End> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while st.0 > 0 {
            st = self.idle.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        match st.1.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Serves requests until the client disconnects (or breaks the protocol, or the server stops).
/// The reads still in flight then are answered before it returns (a disconnect's rule).
pub fn transmit(wire: &mut Wire<'_>, image: &Image, session: Session, dirty: &mut Dirty) -> Result<(), End> {
    let out = wire.replies()?;
    let flight = InFlight::default();
    let (queue, rx) = sync_channel::<Request>(QUEUED);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| answer_reads(&rx, &out, image, session, &flight));
        }
        let r = requests(
            wire,
            &out,
            image,
            dirty,
            |req| {
                flight.failure()?;
                flight.start();
                queue.send(req).map_err(|_| End::Broken("the read workers ended".into()))
            },
            &flight,
        );
        drop(queue); // the workers answer what is queued, then end
        r
    })
}

/// A worker: answers queued reads until the queue closes.
fn answer_reads(rx: &Mutex<Receiver<Request>>, out: &Replies, image: &Image, session: Session, flight: &InFlight) {
    loop {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(req) = next else { return };
        let r =
            if req.kind == CMD_READ { read(out, image, session, req) } else { block_status(out, image, session, req) };
        flight.done(r);
    }
}

/// The reading thread's loop: `queue_read` hands a read or block-status request over; every
/// other request waits for the reads in flight and runs here.
fn requests(
    wire: &mut Wire<'_>,
    out: &Replies,
    image: &Image,
    dirty: &mut Dirty,
    mut queue_read: impl FnMut(Request) -> Result<(), End>,
    flight: &InFlight,
) -> Result<(), End> {
    loop {
        let mut h = [0; 28];
        wire.read_full(&mut h, true)?;
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if magic != REQUEST_MAGIC {
            return Err(End::Broken(format!("bad request magic 0x{magic:x}")));
        }
        let req = Request {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap_or_default()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap_or_default()),
            length: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
        };
        if matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
            queue_read(req)?;
            continue;
        }
        if req.kind == CMD_WRITE {
            // The payload follows the header at once: read it before waiting.
            let payload = write_payload(wire, image, req)?;
            flight.wait_idle()?;
            let r = payload.and_then(|buf| write(image, req, &buf, dirty));
            simple(out, req, r)?;
            continue;
        }
        flight.wait_idle()?;
        match req.kind {
            CMD_DISC => return Err(End::Closed),
            CMD_FLUSH => {
                let r = flush(image, dirty);
                simple(out, req, r)?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let r = zero(image, req, dirty);
                simple(out, req, r)?;
            }
            _ => simple(out, req, Err(EINVAL))?,
        }
    }
}

/// A simple reply: the request's result without data.
fn simple(out: &Replies, req: Request, result: Result<(), u32>) -> Result<(), End> {
    let mut msg = Vec::with_capacity(16);
    msg.put32(SIMPLE_REPLY_MAGIC).put32(result.err().unwrap_or(0)).put64(req.cookie);
    out.send(&[&msg])
}

/// The header of one structured reply chunk.
fn chunk_header(req: Request, flags: u16, kind: u16, len: usize) -> Result<Vec<u8>, End> {
    let len = u32::try_from(len).map_err(|_| End::Broken("reply chunk too long".into()))?;
    let mut msg = Vec::with_capacity(20);
    msg.put32(STRUCTURED_REPLY_MAGIC).put16(flags).put16(kind).put64(req.cookie).put32(len);
    Ok(msg)
}

/// A structured error chunk ending the reply.
fn structured_error(out: &Replies, req: Request, err: u32) -> Result<(), End> {
    let mut head = chunk_header(req, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6)?;
    head.put32(err).put16(0);
    out.send(&[&head])
}

/// Checks that the request lies inside the disk (`err` otherwise).
fn in_bounds(image: &Image, req: Request, err: u32) -> Result<(), u32> {
    match req.offset.checked_add(u64::from(req.length)) {
        Some(end) if end <= image.size => Ok(()),
        _ => Err(err),
    }
}

/// `NBD_CMD_READ`: simple reply with the data, or structured: data and hole chunks.
fn read(out: &Replies, image: &Image, session: Session, req: Request) -> Result<(), End> {
    let data = if req.length > MAX_PAYLOAD {
        Err(EINVAL)
    } else {
        in_bounds(image, req, EINVAL).and_then(|()| {
            let mut buf = vec![0; req.length as usize];
            let file = image.file.read().unwrap_or_else(PoisonError::into_inner);
            file.read_at(&mut buf, req.offset).map_err(|e| errno(&e))?;
            Ok(buf)
        })
    };
    match (data, session.structured) {
        (Err(e), true) => structured_error(out, req, e),
        (Err(e), false) => simple(out, req, Err(e)),
        (Ok(buf), false) => {
            let mut msg = Vec::with_capacity(16);
            msg.put32(SIMPLE_REPLY_MAGIC).put32(0).put64(req.cookie);
            out.send(&[&msg, &buf])
        }
        (Ok(buf), true) => structured_read(out, req, &buf),
    }
}

/// The runs of `buf`: (start, end, all zeros), zero runs made of whole [`HOLE_GRANULE`]s.
fn zero_runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, piece) in buf.chunks(HOLE_GRANULE).enumerate() {
        let start = i * HOLE_GRANULE;
        let zero = piece.iter().all(|&b| b == 0);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = start + piece.len(),
            _ => runs.push((start, start + piece.len(), zero)),
        }
    }
    runs
}

/// A structured read reply: `NBD_REPLY_TYPE_OFFSET_DATA` chunks, zeros as
/// `NBD_REPLY_TYPE_OFFSET_HOLE`, the last chunk flagged done.
fn structured_read(out: &Replies, req: Request, buf: &[u8]) -> Result<(), End> {
    let runs = zero_runs(buf);
    if runs.is_empty() {
        // A zero-length read: one empty data chunk would be invalid; answer with no chunk.
        let head = chunk_header(req, REPLY_FLAG_DONE, super::proto::REPLY_TYPE_NONE, 0)?;
        return out.send(&[&head]);
    }
    let last = runs.len() - 1;
    for (i, &(start, end, zero)) in runs.iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let offset = req.offset + start as u64;
        if zero {
            let mut head = chunk_header(req, flags, REPLY_TYPE_OFFSET_HOLE, 12)?;
            head.put64(offset).put32(u32::try_from(end - start).unwrap_or(u32::MAX));
            out.send(&[&head])?;
        } else {
            let mut head = chunk_header(req, flags, REPLY_TYPE_OFFSET_DATA, 8 + end - start)?;
            head.put64(offset);
            out.send(&[&head, &buf[start..end]])?;
        }
    }
    Ok(())
}

/// `NBD_CMD_WRITE`'s payload, read whole first (a payload too long ends the connection); the
/// write's error if it cannot be applied.
fn write_payload(wire: &mut Wire<'_>, image: &Image, req: Request) -> Result<Result<Vec<u8>, u32>, End> {
    if req.length > MAX_PAYLOAD {
        return Err(End::Broken(format!("a write of {} bytes", req.length)));
    }
    let mut buf = vec![0; req.length as usize];
    wire.read_full(&mut buf, false)?;
    if !image.writable {
        return Ok(Err(EPERM));
    }
    Ok(in_bounds(image, req, ENOSPC).map(|()| buf))
}

/// `NBD_CMD_WRITE` of a payload read whole.
fn write(image: &Image, req: Request, buf: &[u8], dirty: &mut Dirty) -> Result<(), u32> {
    let mut file = image.file.write().unwrap_or_else(PoisonError::into_inner);
    dirty.0 = true;
    let mut r = file.write_at(buf, req.offset);
    if r.is_ok() && req.flags & CMD_FLAG_FUA != 0 {
        r = file.flush();
    }
    r.map_err(|e| errno(&e))
}

/// `NBD_CMD_FLUSH`.
fn flush(image: &Image, dirty: &mut Dirty) -> Result<(), u32> {
    if !image.writable {
        return Ok(());
    }
    let mut file = image.file.write().unwrap_or_else(PoisonError::into_inner);
    file.flush().map_err(|e| errno(&e))?;
    dirty.0 = false;
    Ok(())
}

/// `NBD_CMD_TRIM` (clusters freed) and `NBD_CMD_WRITE_ZEROES` (zero clusters; with
/// `NBD_CMD_FLAG_NO_HOLE`, zeros written as data).
fn zero(image: &Image, req: Request, dirty: &mut Dirty) -> Result<(), u32> {
    if !image.writable {
        return Err(EPERM);
    }
    in_bounds(image, req, ENOSPC)?;
    let mut file = image.file.write().unwrap_or_else(PoisonError::into_inner);
    dirty.0 = true;
    let len = u64::from(req.length);
    let r = if req.kind == CMD_TRIM {
        file.discard(req.offset, len)
    } else if req.flags & CMD_FLAG_NO_HOLE != 0 {
        let zeros = vec![0; ZERO_CHUNK.min(len) as usize];
        let mut off = req.offset;
        let end = req.offset + len;
        let mut r = Ok(());
        while off < end && r.is_ok() {
            let n = (end - off).min(ZERO_CHUNK);
            r = file.write_at(&zeros[..n as usize], off);
            off += n;
        }
        r
    } else {
        file.write_zeroes(req.offset, len)
    };
    let r = r.and_then(|()| if req.flags & CMD_FLAG_FUA != 0 { file.flush() } else { Ok(()) });
    r.map_err(|e| errno(&e))
}

/// The `base:allocation` extents of the request's range: (length, flags), merged.
fn extents(image: &Image, req: Request) -> Result<Vec<(u32, u32)>, u32> {
    let file = image.file.read().unwrap_or_else(PoisonError::into_inner);
    let map = crate::ops::map::map_image(&file, req.offset, Some(u64::from(req.length))).map_err(|e| errno(&e))?;
    let end = req.offset + u64::from(req.length);
    let mut out: Vec<(u32, u32)> = Vec::new();
    for e in &map.entries {
        let start = e.start.max(req.offset);
        let stop = (e.start + e.length).min(end);
        if stop <= start {
            continue;
        }
        let flags = if e.data { 0 } else { STATE_HOLE } | if e.zero { STATE_ZERO } else { 0 };
        // The request's length is a u32, so every extent inside it fits.
        let len = u32::try_from(stop - start).map_err(|_| EIO)?;
        match out.last_mut() {
            Some(last) if last.1 == flags && last.0.checked_add(len).is_some() => last.0 += len,
            _ => out.push((len, flags)),
        }
    }
    if out.is_empty() {
        return Err(EIO);
    }
    Ok(out)
}

/// `NBD_CMD_BLOCK_STATUS` for `base:allocation` (the image's map over its backing chain).
fn block_status(out: &Replies, image: &Image, session: Session, req: Request) -> Result<(), End> {
    let result = if !session.structured || !session.base_allocation || req.length == 0 {
        Err(EINVAL)
    } else {
        in_bounds(image, req, EINVAL).and_then(|()| extents(image, req))
    };
    let mut ext = match result {
        Ok(ext) => ext,
        Err(e) if session.structured => return structured_error(out, req, e),
        Err(e) => return simple(out, req, Err(e)),
    };
    if req.flags & CMD_FLAG_REQ_ONE != 0 {
        ext.truncate(1);
    }
    let mut head = chunk_header(req, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * ext.len())?;
    head.put32(BASE_ALLOCATION_ID);
    for (len, flags) in ext {
        head.put32(len).put32(flags);
    }
    out.send(&[&head])
}

#[cfg(test)]
mod tests {
    use super::zero_runs;

    #[test]
    fn zero_runs_split_whole_granules_and_merge_neighbours() {
        let mut buf = vec![0u8; 5 * 4096 + 100];
        buf[4096 + 7] = 1;
        buf[2 * 4096] = 2;
        assert_eq!(zero_runs(&buf), vec![(0, 4096, true), (4096, 3 * 4096, false), (3 * 4096, 5 * 4096 + 100, true)]);
        assert!(zero_runs(&[]).is_empty());
    }
}
