#![no_main]
//! The agent's `:authority` rewriter in front of the Workload API, fed
//! arbitrary bytes as an HTTP/2 client stream, in reads of varying size.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use sigil_agent::workload_api::h2_authority::AuthorityFix;
use tokio::io::{AsyncRead, ReadBuf};

/// Hands out `data` in chunks whose sizes cycle through `sizes`.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let size = match this.sizes.get(this.turn % this.sizes.len().max(1)) {
            Some(&s) if s > 0 => usize::from(s) * 64,
            _ => usize::MAX,
        };
        this.turn += 1;
        let n = size.min(buf.remaining()).min(this.data.len());
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many chunk-size bytes follow; the rest is the stream.
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(k % 8).min(rest.len());
    let (sizes, stream) = rest.split_at(k);
    let mut fix = AuthorityFix::new(Chunked {
        data: stream,
        sizes,
        turn: 0,
    });
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = vec![0u8; 8192];
    let mut total = 0usize;
    loop {
        let mut buf = ReadBuf::new(&mut out);
        match Pin::new(&mut fix).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => {
                total += buf.filled().len();
                // Re-encoding may grow a block (Huffman decoded, indices
                // spelled out) but never without bound.
                assert!(
                    total <= 64 * stream.len() + 1024 * 1024,
                    "output grew to {total} bytes from {} input bytes",
                    stream.len()
                );
            }
            Poll::Ready(Err(_)) => break,
            Poll::Pending => unreachable!("the in-memory reader is always ready"),
        }
    }
});
