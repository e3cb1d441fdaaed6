//! Lets gRPC C-core and grpc-java clients talk to a Rust (h2) server on a
//! Unix socket.
//!
//! Those clients send the socket path as the HTTP/2 `:authority`
//! (`tmp%2Fagent.sock` from C-core since 1.57, `/tmp/agent.sock` from
//! grpc-java), which the `h2` crate refuses: it resets the stream before any
//! handler runs, and offers no switch to relax the check. [`AuthorityFix`]
//! sits between the socket and the HTTP/2 server and rewrites, in the
//! client's header blocks only, an `:authority` that would not parse into
//! `localhost`. Every other frame passes through byte for byte.
//!
//! Header blocks are HPACK-compressed against a dynamic table that the
//! client's encoder and the server's decoder keep in step. The fix decodes
//! every client block with a decoder that mirrors the client's encoder, and
//! re-encodes it without touching the dynamic table (literals without
//! indexing), so the server's decoder table stays empty and consistent.
//! Huffman-coded strings are decoded first, by [`huffman`], so the HPACK
//! decoder only ever sees plain ones.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod huffman;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Largest frame payload we emit (the HTTP/2 minimum every peer accepts).
const MAX_OUT_FRAME: usize = 16_384;
/// Largest frame payload accepted from the client: the server advertises
/// this SETTINGS_MAX_FRAME_SIZE (the HTTP/2 default, which it must not
/// raise, see [`crate::workload_api::serve`]), so a client may not send
/// more, and a frame is refused as soon as its header announces more
/// instead of being buffered.
pub const MAX_FRAME_SIZE: usize = 16_384;
/// Largest header block (HEADERS plus CONTINUATIONs, still compressed)
/// accepted from the client; the decoded block has the same limit.
const MAX_BLOCK: usize = MAX_DECODED;
/// Largest decoded header block accepted (the server's own limit is 16 KiB
/// by default).
const MAX_DECODED: usize = 64 * 1024;
/// The authority written instead of one the server would refuse.
const REPLACEMENT: &[u8] = b"localhost";

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("http/2 authority fix: {what}"),
    )
}

/// Whether h2 would accept `value` as `:authority`.
fn acceptable(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Appends an HPACK integer with an `n`-bit prefix whose other bits are `flags`.
fn push_int(out: &mut Vec<u8>, n: u8, flags: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// Appends one header as "literal without indexing, new name", no Huffman.
fn push_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    push_int(out, 7, 0, name.len());
    out.extend_from_slice(name);
    push_int(out, 7, 0, value.len());
    out.extend_from_slice(value);
}

/// Reads an HPACK integer with an `n`-bit prefix at `*pos`.
fn read_int(block: &[u8], pos: &mut usize, n: u8) -> io::Result<usize> {
    let truncated = || protocol_error("truncated HPACK integer");
    let max = (1usize << n) - 1;
    let first = usize::from(*block.get(*pos).ok_or_else(truncated)?) & max;
    *pos += 1;
    if first < max {
        return Ok(first);
    }
    let mut value = max;
    for shift in (0..28).step_by(7) {
        let byte = *block.get(*pos).ok_or_else(truncated)?;
        *pos += 1;
        value += usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(protocol_error("HPACK integer too large"))
}

/// Copies the HPACK string literal at `*pos` to `out`, decoding it first if
/// it is Huffman-coded.
fn copy_string(block: &[u8], pos: &mut usize, out: &mut Vec<u8>) -> io::Result<()> {
    let huffman_coded = block.get(*pos).is_some_and(|b| b & 0x80 != 0);
    let len = read_int(block, pos, 7)?;
    let bytes = block
        .get(*pos..)
        .and_then(|rest| rest.get(..len))
        .ok_or_else(|| protocol_error("truncated HPACK string"))?;
    *pos += len;
    if huffman_coded {
        // At most 8 octets per 5 bits.
        let mut plain = Vec::with_capacity(len * 8 / 5 + 1);
        huffman::decode(bytes, &mut plain)
            .map_err(|_| protocol_error("invalid Huffman-coded HPACK string"))?;
        push_int(out, 7, 0, plain.len());
        out.extend_from_slice(&plain);
    } else {
        push_int(out, 7, 0, len);
        out.extend_from_slice(bytes);
    }
    Ok(())
}

/// Rewrites a header block with every Huffman-coded string literal in plain
/// form; representations, indices and table updates are kept as they are,
/// so the block means the same to an HPACK decoder.
fn without_huffman(block: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len() * 2);
    let mut pos = 0;
    while let Some(&first) = block.get(pos) {
        // RFC 7541 section 6: the representation's prefix size, and whether
        // string literals follow.
        let (prefix, literal) = match first {
            0x80.. => (7, false), // indexed field
            0x40.. => (6, true),  // literal with incremental indexing
            0x20.. => (5, false), // dynamic table size update
            _ => (4, true),       // literal without / never indexed
        };
        let start = pos;
        let index = read_int(block, &mut pos, prefix)?;
        out.extend_from_slice(&block[start..pos]);
        if literal {
            if index == 0 {
                copy_string(block, &mut pos, &mut out)?;
            }
            copy_string(block, &mut pos, &mut out)?;
        }
    }
    Ok(out)
}

/// Where the reader is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Preface,
    Frames,
}

/// An open header block (HEADERS without END_HEADERS so far).
#[derive(Debug)]
struct Block {
    stream_id: u32,
    end_stream: bool,
    fragment: Vec<u8>,
}

/// See the module documentation. Writes pass through untouched.
pub struct AuthorityFix<S> {
    inner: S,
    phase: Phase,
    decoder: loona_hpack::Decoder<'static>,
    /// Bytes read from the client, not yet processed.
    input: Vec<u8>,
    /// Processed bytes waiting for the server to read them.
    output: Vec<u8>,
    output_pos: usize,
    block: Option<Block>,
    eof: bool,
}

impl<S> std::fmt::Debug for AuthorityFix<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl<S> AuthorityFix<S> {
    /// Wraps the server side of a client connection.
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        // The server never raises SETTINGS_HEADER_TABLE_SIZE above the
        // default, so the client's table is at most 4096 bytes.
        decoder.set_max_allowed_table_size(4096);
        Self {
            inner,
            phase: Phase::Preface,
            decoder,
            input: Vec::new(),
            output: Vec::new(),
            output_pos: 0,
            block: None,
            eof: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves as much of `input` to `output` as is complete.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.phase {
                Phase::Preface => {
                    if self.input.len() < PREFACE.len() {
                        if !PREFACE.starts_with(&self.input) {
                            return Err(protocol_error("not an HTTP/2 connection preface"));
                        }
                        return Ok(());
                    }
                    if &self.input[..PREFACE.len()] != PREFACE {
                        return Err(protocol_error("not an HTTP/2 connection preface"));
                    }
                    self.output.extend(self.input.drain(..PREFACE.len()));
                    self.phase = Phase::Frames;
                }
                Phase::Frames => {
                    if self.input.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let len = usize::from(self.input[0]) << 16
                        | usize::from(self.input[1]) << 8
                        | usize::from(self.input[2]);
                    if len > MAX_FRAME_SIZE {
                        return Err(protocol_error(
                            "frame larger than the advertised SETTINGS_MAX_FRAME_SIZE",
                        ));
                    }
                    if self.input.len() < FRAME_HEADER_LEN + len {
                        return Ok(());
                    }
                    let frame: Vec<u8> = self.input.drain(..FRAME_HEADER_LEN + len).collect();
                    self.frame(&frame)?;
                }
            }
        }
    }

    fn frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5] & 0x7f, frame[6], frame[7], frame[8]]);
        let payload = &frame[FRAME_HEADER_LEN..];
        match (kind, &mut self.block) {
            (TYPE_HEADERS, None) => {
                let mut body = payload;
                let mut pad = 0usize;
                if flags & FLAG_PADDED != 0 {
                    let (&p, rest) = body
                        .split_first()
                        .ok_or_else(|| protocol_error("bad padding"))?;
                    pad = usize::from(p);
                    body = rest;
                }
                if flags & FLAG_PRIORITY != 0 {
                    body = body
                        .get(5..)
                        .ok_or_else(|| protocol_error("bad priority"))?;
                }
                let end = body
                    .len()
                    .checked_sub(pad)
                    .ok_or_else(|| protocol_error("bad padding"))?;
                self.block = Some(Block {
                    stream_id,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    fragment: body[..end].to_vec(),
                });
                if flags & FLAG_END_HEADERS != 0 {
                    self.finish_block()?;
                }
                Ok(())
            }
            (TYPE_CONTINUATION, Some(block)) if block.stream_id == stream_id => {
                if block.fragment.len() + payload.len() > MAX_BLOCK {
                    return Err(protocol_error("header block too large"));
                }
                block.fragment.extend_from_slice(payload);
                if flags & FLAG_END_HEADERS != 0 {
                    self.finish_block()?;
                }
                Ok(())
            }
            (_, Some(_)) => Err(protocol_error("frame inside an unfinished header block")),
            (TYPE_CONTINUATION, None) => Err(protocol_error("CONTINUATION without HEADERS")),
            (_, None) => {
                self.output.extend_from_slice(frame);
                Ok(())
            }
        }
    }

    fn finish_block(&mut self) -> io::Result<()> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let plain = without_huffman(&block.fragment)?;
        let mut encoded = Vec::with_capacity(plain.len() + 64);
        let mut too_large = false;
        self.decoder
            .decode_with_cb(&plain, |name, value| {
                // Indexed references expand: cap the decoded size, not only
                // the compressed one, so a small block cannot balloon.
                if too_large || encoded.len() + name.len() + value.len() > MAX_DECODED {
                    too_large = true;
                    return;
                }
                let value: &[u8] = if &*name == b":authority" && !acceptable(&value) {
                    REPLACEMENT
                } else {
                    &value
                };
                push_literal(&mut encoded, &name, value);
            })
            .map_err(|e| protocol_error(&format!("HPACK: {e:?}")))?;
        if too_large {
            return Err(protocol_error("decoded header block too large"));
        }
        let chunks: Vec<&[u8]> = if encoded.is_empty() {
            vec![&[][..]]
        } else {
            encoded.chunks(MAX_OUT_FRAME).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let kind = if i == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let mut flags = 0;
            if i == 0 && block.end_stream {
                flags |= FLAG_END_STREAM;
            }
            if i == last {
                flags |= FLAG_END_HEADERS;
            }
            let len = chunk.len();
            self.output.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                kind,
                flags,
            ]);
            self.output
                .extend_from_slice(&block.stream_id.to_be_bytes());
            self.output.extend_from_slice(chunk);
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.output_pos < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.output_pos);
                buf.put_slice(&this.output[this.output_pos..this.output_pos + n]);
                this.output_pos += n;
                if this.output_pos == this.output.len() {
                    this.output.clear();
                    this.output_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Read into the caller's buffer (no buffer of our own to set
            // up per read), then take the bytes back out to look at them.
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    // End of input: whatever is left unprocessed is passed on
                    // as it is, and the server sees the truncation itself.
                    this.eof = true;
                    let rest = std::mem::take(&mut this.input);
                    this.output.extend_from_slice(&rest);
                }
                Poll::Ready(Ok(())) => {
                    this.input.extend_from_slice(&buf.filled()[before..]);
                    buf.set_filled(before);
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;
