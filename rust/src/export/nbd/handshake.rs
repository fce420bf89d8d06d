//! The fixed newstyle handshake: option haggling up to `NBD_OPT_GO` (or the old
//! `NBD_OPT_EXPORT_NAME`), which starts the transmission phase.

use super::proto::{
    End, Put, Wire, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT,
    NBD_MAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY, REPLY_MAGIC, REP_ACK, REP_ERR_INVALID, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
    REP_INFO, REP_META_CONTEXT, REP_SERVER, TF_CAN_MULTI_CONN, TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA,
    TF_SEND_TRIM, TF_SEND_WRITE_ZEROES,
};
use super::MAX_PAYLOAD;

/// Longest option payload read; a longer one is refused with `NBD_REP_ERR_TOO_BIG` after
/// being skipped (up to [`MAX_OPTION_SKIP`]).
const MAX_OPTION: u32 = 64 * 1024;
/// Longest option payload skipped; a longer one ends the connection.
const MAX_OPTION_SKIP: u32 = 16 * 1024 * 1024;
/// The one metadata context served, and its id in the transmission phase.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// See [`BASE_ALLOCATION`].
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Preferred block size advertised (`NBD_INFO_BLOCK_SIZE`).
const PREFERRED_BLOCK: u32 = 4096;

/// What the server exports: one image, under the default (empty) name.
#[derive(Clone, Copy, Debug)]
pub struct ExportInfo {
    /// Virtual size in bytes.
    pub size: u64,
    /// Writes are accepted.
    pub writable: bool,
}

impl ExportInfo {
    /// Transmission flags of the export.
    pub fn flags(self) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH;
        if self.writable {
            f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        } else {
            f |= TF_READ_ONLY | TF_CAN_MULTI_CONN;
        }
        f
    }
}

/// What the handshake settled for the transmission phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Session {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The `base:allocation` context was selected (`NBD_CMD_BLOCK_STATUS` answers it).
    pub base_allocation: bool,
}

/// The export names answered: the default export only.
fn known_export(name: &[u8]) -> bool {
    name.is_empty()
}

/// Runs the handshake; `Ok` once the client entered the transmission phase.
pub fn negotiate(wire: &mut Wire<'_>, export: ExportInfo) -> Result<Session, End> {
    let mut hello = Vec::with_capacity(18);
    hello.put64(NBD_MAGIC).put64(IHAVEOPT).put16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    wire.send(&[&hello])?;
    let mut cf = [0; 4];
    wire.read_full(&mut cf, true)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(1 | FLAG_C_NO_ZEROES) != 0 {
        return Err(End::Broken(format!("unknown client flags 0x{client_flags:x}")));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut session = Session::default();
    loop {
        let mut head = [0; 16];
        wire.read_full(&mut head, true)?;
        let magic = u64::from_be_bytes(head[..8].try_into().unwrap_or_default());
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[12..].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(End::Broken(format!("bad option magic 0x{magic:x}")));
        }
        let Some(data) = read_option_data(wire, option, len)? else { continue };
        match option {
            OPT_EXPORT_NAME => {
                export_name(wire, export, &data, no_zeroes)?;
                return Ok(session);
            }
            OPT_ABORT => {
                reply(wire, option, REP_ACK, &[])?;
                return Err(End::Closed);
            }
            OPT_GO | OPT_INFO => {
                if info(wire, option, export, &data)? && option == OPT_GO {
                    return Ok(session);
                }
            }
            OPT_LIST => list(wire, &data)?,
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    session.structured = true;
                    reply(wire, option, REP_ACK, &[])?;
                } else {
                    reply(wire, option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => meta_context(wire, option, &data, &mut session)?,
            _ => reply(wire, option, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// The payload of an option; `None` when it was too long (skipped and refused).
fn read_option_data(wire: &mut Wire<'_>, option: u32, len: u32) -> Result<Option<Vec<u8>>, End> {
    if len <= MAX_OPTION {
        let mut data = vec![0; len as usize];
        wire.read_full(&mut data, false)?;
        return Ok(Some(data));
    }
    if len > MAX_OPTION_SKIP {
        return Err(End::Broken(format!("option {option} with {len} bytes of data")));
    }
    let mut left = len as usize;
    let mut sink = vec![0; 64 * 1024];
    while left > 0 {
        let n = left.min(sink.len());
        wire.read_full(&mut sink[..n], false)?;
        left -= n;
    }
    reply(wire, option, REP_ERR_TOO_BIG, b"option data too long")?;
    Ok(None)
}

/// Sends one option reply.
fn reply(wire: &mut Wire<'_>, option: u32, kind: u32, data: &[u8]) -> Result<(), End> {
    let len = u32::try_from(data.len()).map_err(|_| End::Broken("option reply too long".into()))?;
    let mut head = Vec::with_capacity(20);
    head.put64(REPLY_MAGIC).put32(option).put32(kind).put32(len);
    wire.send(&[&head, data])
}

/// `NBD_OPT_EXPORT_NAME`: the export's size and flags, no option reply header.
fn export_name(wire: &mut Wire<'_>, export: ExportInfo, name: &[u8], no_zeroes: bool) -> Result<(), End> {
    if !known_export(name) {
        return Err(End::Broken("unknown export name".into()));
    }
    let mut msg = Vec::with_capacity(134);
    msg.put64(export.size).put16(export.flags());
    if !no_zeroes {
        msg.extend_from_slice(&[0; 124]);
    }
    wire.send(&[&msg])
}

/// A counted string at `*at` (`u32` length, bytes), moving `*at` past it.
fn take_string<'d>(data: &'d [u8], at: &mut usize) -> Option<&'d [u8]> {
    let len = u32::from_be_bytes(data.get(*at..*at + 4)?.try_into().ok()?) as usize;
    let s = data.get(*at + 4..(*at + 4).checked_add(len)?)?;
    *at += 4 + len;
    Some(s)
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO`: the export's information then `NBD_REP_ACK`; returns whether
/// the export was found (and answered).
fn info(wire: &mut Wire<'_>, option: u32, export: ExportInfo, data: &[u8]) -> Result<bool, End> {
    let mut at = 0;
    let parsed = take_string(data, &mut at).and_then(|name| {
        let n = u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?) as usize;
        (data.len() == at + 2 + 2 * n).then_some(name)
    });
    let Some(name) = parsed else {
        reply(wire, option, REP_ERR_INVALID, b"malformed request")?;
        return Ok(false);
    };
    if !known_export(name) {
        reply(wire, option, REP_ERR_UNKNOWN, b"unknown export (the export name is empty)")?;
        return Ok(false);
    }
    let mut exp = Vec::with_capacity(12);
    exp.put16(INFO_EXPORT).put64(export.size).put16(export.flags());
    reply(wire, option, REP_INFO, &exp)?;
    let mut bs = Vec::with_capacity(14);
    bs.put16(INFO_BLOCK_SIZE).put32(1).put32(PREFERRED_BLOCK).put32(MAX_PAYLOAD);
    reply(wire, option, REP_INFO, &bs)?;
    reply(wire, option, REP_ACK, &[])?;
    Ok(true)
}

/// `NBD_OPT_LIST`: the one export.
fn list(wire: &mut Wire<'_>, data: &[u8]) -> Result<(), End> {
    if !data.is_empty() {
        return reply(wire, OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
    }
    let mut server = Vec::with_capacity(4);
    server.put32(0);
    reply(wire, OPT_LIST, REP_SERVER, &server)?;
    reply(wire, OPT_LIST, REP_ACK, &[])
}

/// The export name and queries of a meta context request; `None` if malformed.
fn parse_meta(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut at = 0;
    let name = take_string(data, &mut at)?;
    let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?);
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(take_string(data, &mut at)?);
    }
    (at == data.len()).then_some((name, queries))
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: only `base:allocation` exists.
fn meta_context(wire: &mut Wire<'_>, option: u32, data: &[u8], session: &mut Session) -> Result<(), End> {
    let set = option == OPT_SET_META_CONTEXT;
    if set && !session.structured {
        return reply(wire, option, REP_ERR_INVALID, b"structured replies have not been negotiated");
    }
    let Some((name, queries)) = parse_meta(data) else {
        return reply(wire, option, REP_ERR_INVALID, b"malformed request");
    };
    if !known_export(name) {
        return reply(wire, option, REP_ERR_UNKNOWN, b"unknown export (the export name is empty)");
    }
    let matches = if set {
        queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
    } else {
        queries.is_empty() || queries.iter().any(|q| *q == b"base:" || *q == BASE_ALLOCATION.as_bytes())
    };
    if set {
        session.base_allocation = matches;
    }
    if matches {
        let mut ctx = Vec::with_capacity(4 + BASE_ALLOCATION.len());
        ctx.put32(if set { BASE_ALLOCATION_ID } else { 0 });
        ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
        reply(wire, option, REP_META_CONTEXT, &ctx)?;
    }
    reply(wire, option, REP_ACK, &[])
}

#[cfg(test)]
mod tests {
    use super::parse_meta;

    #[test]
    fn meta_requests_are_parsed_exactly() {
        let mut d = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15];
        d.extend_from_slice(b"base:allocation");
        let (name, queries) = parse_meta(&d).unwrap();
        assert!(name.is_empty());
        assert_eq!(queries, vec![&b"base:allocation"[..]]);
        assert!(parse_meta(&d[..d.len() - 1]).is_none());
        d.push(0);
        assert!(parse_meta(&d).is_none());
        // A query count far beyond the data is refused without allocating for it.
        assert!(parse_meta(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_none());
    }
}
