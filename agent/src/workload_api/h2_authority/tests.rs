//! The fix in front of a real HTTP/2 server (hyper/h2), fed the header
//! blocks gRPC C-core and grpc-java send on Unix sockets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

fn string(out: &mut Vec<u8>, s: &[u8]) {
    push_int(out, 7, 0, s.len());
    out.extend_from_slice(s);
}

/// A request header block as C-core writes it: `:path` and `:authority`
/// as literals with incremental indexing, so later requests refer to them
/// by dynamic-table index.
fn first_block(path: &[u8], authority: &[u8]) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    b.push(0x44); // :path, literal with incremental indexing, static name 4
    string(&mut b, path);
    b.push(0x41); // :authority, literal with incremental indexing, static name 1
    string(&mut b, authority);
    b
}

/// [`first_block`] with both strings Huffman-coded, as C-core and h2 send
/// them.
fn huffman_first_block(path: &[u8], authority: &[u8]) -> Vec<u8> {
    let mut b = vec![0x83, 0x86, 0x44];
    for s in [path, authority] {
        let coded = huffman::encode(s);
        push_int(&mut b, 7, 0x80, coded.len());
        b.extend_from_slice(&coded);
        if s == path {
            b.push(0x41);
        }
    }
    b
}

/// A later request reusing both dynamic entries (62 = authority, 63 = path).
fn repeat_block() -> Vec<u8> {
    vec![0x83, 0x86, 0x80 | 63, 0x80 | 62]
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn client_bytes(blocks: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // empty SETTINGS
    for (stream, block) in blocks {
        bytes.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            *stream,
            block,
        ));
    }
    bytes
}

/// Serves one connection with hyper's HTTP/2 server, recording the
/// authority of every request that reaches the handler.
async fn serve(server_side: DuplexStream, fix: bool) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(
                req.uri()
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            );
            Ok::<_, std::convert::Infallible>(hyper::Response::new(String::from("ok")))
        }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // Room for the oversized header of the CONTINUATION test.
    builder.max_header_list_size(1 << 20);
    if fix {
        tokio::spawn(builder.serve_connection(TokioIo::new(AuthorityFix::new(server_side)), svc));
    } else {
        tokio::spawn(builder.serve_connection(TokioIo::new(server_side), svc));
    }
    seen
}

/// Sends `bytes` as the client and keeps draining the server's answers.
async fn run_client(mut client: DuplexStream, bytes: Vec<u8>) {
    client.write_all(&bytes).await.unwrap();
    tokio::spawn(async move {
        let mut sink = [0u8; 4096];
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    });
}

async fn requests_seen(seen: &Arc<Mutex<Vec<String>>>, want: usize) -> Vec<String> {
    for _ in 0..100 {
        if seen.lock().unwrap().len() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    seen.lock().unwrap().clone()
}

#[tokio::test]
async fn without_the_fix_h2_refuses_c_core_authorities() {
    let (client, server) = tokio::io::duplex(1 << 16);
    let seen = serve(server, false).await;
    run_client(
        client,
        client_bytes(&[(1, first_block(b"/test", b"tmp%2Fagent.sock"))]),
    )
    .await;
    assert!(
        requests_seen(&seen, 1).await.is_empty(),
        "h2 resets the stream before the handler"
    );
}

#[tokio::test]
async fn huffman_coded_authorities_are_decoded_and_fixed() {
    for (authority, want) in [
        (&b"tmp%2Fagent.sock"[..], "localhost"),
        (b"/run/sigil/agent.sock", "localhost"),
        (b"example.org:8443", "example.org:8443"),
    ] {
        let (client, server) = tokio::io::duplex(1 << 16);
        let seen = serve(server, true).await;
        let blocks = vec![
            (1, huffman_first_block(b"/test", authority)),
            (3, repeat_block()),
        ];
        run_client(client, client_bytes(&blocks)).await;
        assert_eq!(requests_seen(&seen, 2).await, vec![want; 2]);
        // What the HPACK decoder is given has the same strings, plain.
        assert_eq!(
            without_huffman(&huffman_first_block(b"/test", authority)).unwrap(),
            first_block(b"/test", authority)
        );
    }
    // A Huffman string that is not valid (EOS inside) ends the connection.
    let mut fix = AuthorityFix::new(());
    fix.input.extend_from_slice(PREFACE);
    let block = [0x41, 0x84, 0xff, 0xff, 0xff, 0xfc];
    fix.input
        .extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
    assert!(fix.process().unwrap_err().to_string().contains("Huffman"));
}

#[tokio::test]
async fn c_core_and_java_authorities_become_localhost() {
    for bad in [
        &b"tmp%2Fagent.sock"[..],
        b"%2Frun%2Fsigil%2Fagent.sock",
        b"/run/sigil/agent.sock",
    ] {
        let (client, server) = tokio::io::duplex(1 << 16);
        let seen = serve(server, true).await;
        let blocks = vec![
            (1, first_block(b"/test", bad)),
            (3, repeat_block()),
            (5, repeat_block()),
        ];
        run_client(client, client_bytes(&blocks)).await;
        let got = requests_seen(&seen, 3).await;
        assert_eq!(
            got,
            vec!["localhost"; 3],
            "authority {:?}: dynamic-table references stay in step",
            String::from_utf8_lossy(bad)
        );
    }
}

#[tokio::test]
async fn acceptable_authorities_are_left_alone() {
    let (client, server) = tokio::io::duplex(1 << 16);
    let seen = serve(server, true).await;
    run_client(
        client,
        client_bytes(&[
            (1, first_block(b"/test", b"localhost")),
            (3, first_block(b"/x", b"example.org:443")),
        ]),
    )
    .await;
    assert_eq!(
        requests_seen(&seen, 2).await,
        vec!["localhost".to_string(), "example.org:443".to_string()]
    );
}

#[tokio::test]
async fn padded_prioritised_and_continued_blocks_are_reassembled() {
    let (client, server) = tokio::io::duplex(1 << 20);
    let seen = serve(server, true).await;
    let mut block = first_block(b"/test", b"tmp%2Fagent.sock");
    // A large header forces our re-encoded block over one frame.
    block.push(0x00);
    string(&mut block, b"x-big");
    string(&mut block, &vec![b'a'; 20_000]);
    let (head, tail) = block.split_at(10);
    let mut payload = vec![3u8]; // pad length
    payload.extend_from_slice(&[0, 0, 0, 0, 16]); // priority: stream dependency 0, weight 16
    payload.extend_from_slice(head);
    payload.extend_from_slice(&[0, 0, 0]); // padding
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    bytes.extend(frame(
        TYPE_HEADERS,
        FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
        1,
        &payload,
    ));
    // CONTINUATIONs of at most the advertised frame size, as a client must.
    let chunks: Vec<&[u8]> = tail.chunks(MAX_FRAME_SIZE).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() {
            FLAG_END_HEADERS
        } else {
            0
        };
        bytes.extend(frame(TYPE_CONTINUATION, flags, 1, chunk));
    }
    run_client(client, bytes).await;
    assert_eq!(requests_seen(&seen, 1).await, vec!["localhost"]);
}

#[test]
fn refuses_what_is_not_http2() {
    let mut fix = AuthorityFix::new(());
    fix.input.extend_from_slice(b"GET / HTTP/1.1\r\n");
    assert!(fix.process().is_err());
    let mut fix = AuthorityFix::new(());
    fix.input.extend_from_slice(PREFACE);
    fix.input
        .extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x83]));
    assert!(fix.process().is_err(), "CONTINUATION without HEADERS");
    let mut fix = AuthorityFix::new(());
    fix.input.extend_from_slice(PREFACE);
    fix.input.extend(frame(TYPE_HEADERS, 0, 1, &[0x83]));
    fix.input.extend(frame(0x0, 0, 1, b"data"));
    assert!(
        fix.process().is_err(),
        "a DATA frame inside an open header block"
    );
    let mut fix = AuthorityFix::new(());
    fix.input.extend_from_slice(PREFACE);
    fix.input.extend(frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS,
        1,
        &[0xff, 0xff, 0xff, 0xff, 0x0f],
    ));
    assert!(fix.process().is_err(), "an HPACK index beyond every table");
}

#[test]
fn hpack_integers() {
    let enc = |n, v| {
        let mut o = Vec::new();
        push_int(&mut o, n, 0, v);
        o
    };
    // RFC 7541 C.1 examples.
    assert_eq!(enc(5, 10), [10]);
    assert_eq!(enc(5, 1337), [31, 154, 10]);
    assert_eq!(enc(8, 42), [42]);
}

#[test]
fn a_header_block_that_expands_too_far_is_refused() {
    // One 4000-byte literal into the dynamic table, then 100 references
    // to it: 4 KB compressed expands to 400 KB.
    let mut block = vec![0x40];
    string(&mut block, b"x-fill");
    string(&mut block, &vec![b'a'; 4000]);
    block.extend(std::iter::repeat_n(0x80 | 62, 100));
    let mut fix = AuthorityFix::new(());
    fix.input.extend_from_slice(PREFACE);
    fix.input
        .extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
    assert!(fix.process().unwrap_err().to_string().contains("too large"));
}

/// Issue 13 item 3: a frame over the advertised size is refused when its
/// header arrives, before its payload is buffered.
#[test]
fn a_frame_over_the_advertised_size_is_refused_at_its_header() {
    let mut fix = AuthorityFix::new(());
    fix.input.extend_from_slice(PREFACE);
    fix.input.extend(frame(0x0, 0, 1, &vec![0; MAX_FRAME_SIZE]));
    fix.process().unwrap();
    let mut header = frame(0x0, 0, 1, &[]);
    let len = MAX_FRAME_SIZE + 1;
    header[..3].copy_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8]);
    fix.input.extend(header);
    assert!(
        fix.process()
            .unwrap_err()
            .to_string()
            .contains("SETTINGS_MAX_FRAME_SIZE")
    );
}
