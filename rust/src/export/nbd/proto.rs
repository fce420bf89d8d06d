//! The NBD wire format (the protocol's `doc/proto.md`): magics, option, command, flag and
//! error numbers, and the stream a connection reads and writes (reads that see the server
//! stopping).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// "NBDMAGIC": the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation; also the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags: fixed newstyle, and no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// See [`FLAG_FIXED_NEWSTYLE`].
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client asks for no zero padding.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_ABORT: u32 = 2;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_LIST: u32 = 3;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_INFO: u32 = 6;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_GO: u32 = 7;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// See [`OPT_EXPORT_NAME`].
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option replies.
pub const REP_ACK: u32 = 1;
/// See [`REP_ACK`].
pub const REP_SERVER: u32 = 2;
/// See [`REP_ACK`].
pub const REP_INFO: u32 = 3;
/// See [`REP_ACK`].
pub const REP_META_CONTEXT: u32 = 4;
/// Option error replies (bit 31 set).
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
/// See [`REP_ERR_UNSUP`].
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
/// See [`REP_ERR_UNSUP`].
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
/// See [`REP_ERR_UNSUP`].
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
/// See [`INFO_EXPORT`].
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1;
/// See [`TF_HAS_FLAGS`].
pub const TF_READ_ONLY: u16 = 1 << 1;
/// See [`TF_HAS_FLAGS`].
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// See [`TF_HAS_FLAGS`].
pub const TF_SEND_FUA: u16 = 1 << 3;
/// See [`TF_HAS_FLAGS`].
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// See [`TF_HAS_FLAGS`].
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// See [`TF_HAS_FLAGS`].
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub const CMD_READ: u16 = 0;
/// See [`CMD_READ`].
pub const CMD_WRITE: u16 = 1;
/// See [`CMD_READ`].
pub const CMD_DISC: u16 = 2;
/// See [`CMD_READ`].
pub const CMD_FLUSH: u16 = 3;
/// See [`CMD_READ`].
pub const CMD_TRIM: u16 = 4;
/// See [`CMD_READ`].
pub const CMD_WRITE_ZEROES: u16 = 6;
/// See [`CMD_READ`].
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1;
/// See [`CMD_FLAG_FUA`].
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// See [`CMD_FLAG_FUA`].
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Structured reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// See [`REPLY_TYPE_NONE`].
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// See [`REPLY_TYPE_NONE`].
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// See [`REPLY_TYPE_NONE`].
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// See [`REPLY_TYPE_NONE`].
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` states.
pub const STATE_HOLE: u32 = 1;
/// See [`STATE_HOLE`].
pub const STATE_ZERO: u32 = 2;

/// Error numbers on the wire (Linux values, as the protocol defines them).
pub const EPERM: u32 = 1;
/// See [`EPERM`].
pub const EIO: u32 = 5;
/// See [`EPERM`].
pub const EINVAL: u32 = 22;
/// See [`EPERM`].
pub const ENOSPC: u32 = 28;

/// How long a blocking read waits before it looks at the stop flag again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a request already begun may take to arrive once the server is stopping.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// A client that reads no reply for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// A client's socket: TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix socket connection.
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn set_timeouts(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(POLL_INTERVAL))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Stream::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(POLL_INTERVAL))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Why a connection ends.
#[derive(Debug)]
pub enum End {
    /// The client closed the connection (or aborted, or disconnected politely).
    Closed,
    /// The server is stopping.
    Stopped,
    /// The client broke the protocol or the socket failed: the connection is dropped. The
    /// reason is for debugging (`Debug`); nothing reports it.
    Broken(#[allow(dead_code)] String),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            End::Closed
        } else {
            End::Broken(e.to_string())
        }
    }
}

/// A connection's stream with reads that notice the server stopping: between requests a
/// stop ends the connection at once; a request already begun has [`STOP_GRACE`] to arrive.
pub struct Wire<'a> {
    stream: Stream,
    stop: &'a AtomicBool,
}

impl<'a> Wire<'a> {
    /// Wraps an accepted stream (made blocking, with the timeouts the reads rely on).
    pub fn new(stream: Stream, stop: &'a AtomicBool) -> io::Result<Self> {
        stream.set_timeouts()?;
        Ok(Wire { stream, stop })
    }

    /// Fills `buf`. `at_boundary`: nothing of the next message has been read yet, so a stop
    /// (or the client closing) ends the connection cleanly.
    pub fn read_full(&mut self, buf: &mut [u8], at_boundary: bool) -> Result<(), End> {
        let mut got = 0;
        let mut stopping_since: Option<Instant> = None;
        while got < buf.len() {
            match self.stream.read(&mut buf[got..]) {
                Ok(0) if got == 0 && at_boundary => return Err(End::Closed),
                Ok(0) => return Err(End::Broken("the client closed the connection inside a message".into())),
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if self.stop.load(Ordering::Relaxed) {
                        if got == 0 && at_boundary {
                            return Err(End::Stopped);
                        }
                        let since = *stopping_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > STOP_GRACE {
                            return Err(End::Stopped);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Writes all of `parts`, in order.
    pub fn send(&mut self, parts: &[&[u8]]) -> Result<(), End> {
        for p in parts {
            self.stream.write_all(p)?;
        }
        Ok(())
    }

    /// The sending half of the connection, for the transmission phase's threads.
    pub fn replies(&self) -> Result<Replies, End> {
        Ok(Replies(Mutex::new(self.stream.try_clone()?)))
    }
}

/// The sending half of a connection, shared by the threads answering its requests: each
/// [`Replies::send`] is written whole before another starts, so messages never interleave
/// (a structured reply's chunks may interleave with another request's, as the protocol
/// allows).
pub struct Replies(Mutex<Stream>);

impl Replies {
    /// Writes all of `parts`, in order, as one message.
    pub fn send(&self, parts: &[&[u8]]) -> Result<(), End> {
        let mut stream = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for p in parts {
            stream.write_all(p)?;
        }
        Ok(())
    }
}

/// Appends big-endian integers to a message being built.
pub trait Put {
    /// Appends `v`.
    fn put16(&mut self, v: u16) -> &mut Self;
    /// Appends `v`.
    fn put32(&mut self, v: u32) -> &mut Self;
    /// Appends `v`.
    fn put64(&mut self, v: u64) -> &mut Self;
}

impl Put for Vec<u8> {
    fn put16(&mut self, v: u16) -> &mut Self {
        self.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn put32(&mut self, v: u32) -> &mut Self {
        self.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn put64(&mut self, v: u64) -> &mut Self {
        self.extend_from_slice(&v.to_be_bytes());
        self
    }
}
