//! An NBD server over one image: the fixed newstyle handshake (`NBD_OPT_GO`, `INFO`, `LIST`,
//! structured replies, the `base:allocation` metadata context) and the transmission phase
//! (`READ`, `WRITE` with FUA, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `BLOCK_STATUS`, `DISC`), written
//! from the protocol's `doc/proto.md`.
//!
//! One thread per client, at most `shared` at once (further clients wait in the listen
//! queue). Reads of all clients run in parallel on the one [`QcowFile`] (`read_at(&self)`);
//! writes, zeroing, trims and flushes take its write lock, so the image sees them one at a
//! time, each applied whole: a client that disconnects in the middle of a request never had
//! that request applied. [`serve`] runs until its `stop` callback says so, then stops
//! accepting, lets every client finish the request it is sending, flushes and closes the image.

mod handshake;
mod proto;
mod transmission;

use std::io;
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock};
use std::thread;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::qcow_file::QcowFile;
use handshake::ExportInfo;
use proto::{End, Stream, Wire};
use transmission::{Dirty, Image};

/// Largest read or write payload (`NBD_INFO_BLOCK_SIZE`'s maximum): the protocol's advised
/// 32 MiB.
pub(crate) const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// How often the accept loop looks for clients and asks `stop`.
const ACCEPT_INTERVAL: Duration = Duration::from_millis(50);

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A TCP address.
    Tcp(TcpListener),
    /// A Unix socket, removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `host:port` (TCP).
    pub fn tcp(host: &str, port: u16) -> Result<Self> {
        let l = TcpListener::bind((host, port)).map_err(|e| Error::io(format!("listening on {host}:{port}"), e))?;
        l.set_nonblocking(true).map_err(|e| Error::io("listening socket", e))?;
        Ok(Listener::Tcp(l))
    }

    /// Listens on a Unix socket at `path`. A socket file nobody listens on any more is replaced;
    /// a live socket or any other file there is refused.
    pub fn unix(path: &Path) -> Result<Self> {
        let what = || format!("socket '{}'", path.display());
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(Error::InvalidArgument(format!("{} exists and is not a socket", what())));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InvalidArgument(format!("{} is in use by another server", what())));
            }
            std::fs::remove_file(path).map_err(|e| Error::io(format!("removing the stale {}", what()), e))?;
        }
        let l = UnixListener::bind(path).map_err(|e| Error::io(format!("listening on {}", what()), e))?;
        l.set_nonblocking(true).map_err(|e| Error::io("listening socket", e))?;
        Ok(Listener::Unix(l, path.to_path_buf()))
    }

    /// The TCP port listened on (the one chosen when asked for port 0).
    pub fn port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Serves `image` (read-write if it was opened so) to at most `shared` clients at once on
/// `listener`, until `stop()` returns true (asked every few tens of milliseconds, on the
/// calling thread). Then no client is accepted any more, each connected client's current
/// request is finished, the connections are closed, and a writable image is flushed and
/// closed. Errors of one connection (a client breaking the protocol) end that connection only.
pub fn serve(image: QcowFile, listener: &Listener, shared: usize, stop: &dyn Fn() -> bool) -> Result<()> {
    if shared == 0 {
        return Err(Error::InvalidArgument("shared must be at least 1".into()));
    }
    let export = ExportInfo { size: image.virtual_size(), writable: image.writable() };
    let image = Image { file: RwLock::new(image), size: export.size, writable: export.writable };
    let stopping = AtomicBool::new(false);
    let active = AtomicUsize::new(0);
    thread::scope(|s| {
        while !stop() {
            if active.load(Ordering::Acquire) >= shared {
                thread::sleep(ACCEPT_INTERVAL);
                continue;
            }
            match listener.accept() {
                Ok(stream) => {
                    active.fetch_add(1, Ordering::AcqRel);
                    let (image, stopping, active) = (&image, &stopping, &active);
                    s.spawn(move || {
                        client(stream, image, export, stopping);
                        active.fetch_sub(1, Ordering::AcqRel);
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock: nobody waiting; other errors (EMFILE, a client gone before it
                // was accepted) are retried after the pause too.
                Err(_) => thread::sleep(ACCEPT_INTERVAL),
            }
        }
        stopping.store(true, Ordering::Release);
    });
    let mut file = image.file.into_inner().unwrap_or_else(PoisonError::into_inner);
    if export.writable {
        file.flush()?;
        file.close()?;
    }
    Ok(())
}

/// One client's connection, from the handshake to its end; a writable image is flushed when
/// a client that changed it leaves.
fn client(stream: Stream, image: &Image, export: ExportInfo, stopping: &AtomicBool) {
    let Ok(mut wire) = Wire::new(stream, stopping) else { return };
    let mut dirty = Dirty::default();
    let end = handshake::negotiate(&mut wire, export)
        .and_then(|session| transmission::transmit(&mut wire, image, session, &mut dirty));
    // However the connection ended (closed, broken, server stopping), what it wrote is
    // flushed now.
    let _: End = end.err().unwrap_or(End::Closed);
    if dirty.0 {
        let mut file = image.file.write().unwrap_or_else(PoisonError::into_inner);
        // A failure here is seen again by the final flush, which reports it.
        let _ = file.flush();
    }
}
