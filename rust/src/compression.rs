//! Compressed clusters: raw deflate (compression_type 0) and zstd (1), decoded the way QEMU
//! does: the output must fill the whole cluster; trailing sector padding in the input is
//! ignored.

use crate::format::COMPRESSION_ZSTD;

/// Decompresses `input` into exactly `out.len()` bytes. Returns a reason on failure.
pub fn decompress(compression_type: u8, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    if compression_type == COMPRESSION_ZSTD {
        zstd_decompress(input, out)
    } else {
        deflate_decompress(input, out)
    }
}

/// `data` (one guest cluster of `cluster_size` bytes, or a disk's short last one, padded with
/// zeros) compressed as a qcow2 compressed cluster; `None` when that would not save at least
/// one byte. Pure: [`crate::ops::convert`] runs it on every core.
pub fn compress_cluster(compression_type: u8, cluster_size: u64, data: &[u8]) -> Option<Vec<u8>> {
    let cs = usize::try_from(cluster_size).unwrap_or(0);
    let limit = cs.saturating_sub(1);
    if data.len() >= cs {
        return compress(compression_type, &data[..cs], limit);
    }
    let mut cluster = data.to_vec();
    cluster.resize(cs, 0);
    compress(compression_type, &cluster, limit)
}

thread_local! {
    /// One inflate state per thread, reset between clusters instead of allocated for each.
    static INFLATE: std::cell::RefCell<flate2::Decompress> = std::cell::RefCell::new(flate2::Decompress::new(false));
}

fn deflate_decompress(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    INFLATE.with(|d| deflate_with(&mut d.borrow_mut(), input, out))
}

fn deflate_with(d: &mut flate2::Decompress, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    // QEMU writes raw deflate (window bits -12) and accepts Z_STREAM_END or Z_BUF_ERROR as long
    // as the output buffer is full.
    d.reset(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
        Ok(status) => Err(format!("deflate stream ended after {} of {} bytes ({status:?})", d.total_out(), out.len())),
        Err(e) => Err(format!("deflate error: {e}")),
    }
}

fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| format!("zstd init: {e}"))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    // Streaming decode as QEMU's qcow2_zstd_decompress: stop once the cluster is full, so the
    // sector padding after the frame is never parsed.
    loop {
        let before = (inb.pos(), outb.pos());
        match dec.run(&mut inb, &mut outb) {
            Ok(_) => {}
            Err(e) => return Err(format!("zstd error: {e}")),
        }
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if (inb.pos(), outb.pos()) == before || inb.pos() == input.len() {
            return Err(format!("zstd stream ended after {} of {} bytes", outb.pos(), outb.capacity()));
        }
    }
}

/// Compresses one cluster as QEMU's compressed writes do (raw deflate with a 4 KiB window,
/// which QEMU's inflate needs; or a zstd frame at the default level). Returns `None` if the
/// result would not fit in `limit` bytes (QEMU writes such a cluster uncompressed).
pub fn compress(compression_type: u8, data: &[u8], limit: usize) -> Option<Vec<u8>> {
    if compression_type == COMPRESSION_ZSTD {
        ZSTD.with(|c| {
            let mut c = c.borrow_mut();
            let z = match c.as_mut() {
                Some(z) => z,
                None => c.insert(zstd::bulk::Compressor::new(0).ok()?),
            };
            // A buffer of `limit` bytes: a frame that does not fit fails, as it should.
            let mut out = Vec::with_capacity(limit);
            z.compress_to_buffer(data, &mut out).ok()?;
            (out.len() <= limit).then_some(out)
        })
    } else {
        DEFLATE.with(|c| {
            let mut c = c.borrow_mut();
            c.reset();
            let mut out = Vec::with_capacity(limit + 1);
            match c.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() <= limit => Some(out),
                _ => None,
            }
        })
    }
}

thread_local! {
    /// One zstd compression context per thread (made on first use).
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    /// One deflate state per thread (window bits 12, as QEMU's `deflateInit2(.., -12, ..)`).
    static DEFLATE: std::cell::RefCell<flate2::Compress> =
        std::cell::RefCell::new(flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incompressible_data_is_refused() {
        let mut x = 0x1234_5678_u32;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(compress(0, &data, data.len() - 1).is_none());
        assert!(compress(1, &data, data.len() - 1).is_none());
    }

    #[test]
    fn roundtrip_with_padding() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for t in [0u8, 1] {
            let mut c = compress(t, &data, data.len() - 1).unwrap();
            c.extend_from_slice(&[0xee; 300]); // sector padding / neighbouring data
            let mut out = vec![0u8; data.len()];
            decompress(t, &c, &mut out).unwrap();
            assert_eq!(out, data);
            let mut short = vec![0u8; data.len()];
            assert!(decompress(t, &c[..c.len() / 3], &mut short).is_err());
        }
    }
}
