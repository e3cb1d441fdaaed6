//! The node API under hostile or unlucky callers, against the real server
//! process over real sockets: what it reads before authentication, how
//! many connections it holds, how long it waits, and what it pins agents to.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{TestServerExt as _, csr};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use sigil_proto::node as pb;
use sigil_tests::process::ServerProcess;
use sigil_tests::sim_agent::SimAgent;
use tokio_stream::{Stream, StreamExt};
use tonic::Code;

type RawBody = BoxBody<Bytes, Infallible>;

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A raw HTTP/2 connection to the node API over TLS.
async fn raw_h2(server: &ServerProcess, tls: Arc<rustls::ClientConfig>) -> SendRequest<RawBody> {
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("sigil-server").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A gRPC request to `method` whose one message declares `declared` bytes
/// but carries only `sent`, and whose body then never ends.
fn declared(method: &str, declared: u32, sent: usize) -> hyper::Request<RawBody> {
    let mut header = vec![0u8];
    header.extend_from_slice(&declared.to_be_bytes());
    let chunks = std::iter::once(Bytes::from(header))
        .chain((0..sent.div_ceil(16 * 1024)).map(|_| Bytes::from(vec![0u8; 16 * 1024])));
    let frames: Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync>> =
        Box::pin(
            tokio_stream::iter(chunks.map(|b| Ok(Frame::data(b)))).chain(tokio_stream::pending()),
        );
    hyper::Request::builder()
        .method("POST")
        .uri(format!("http://sigil-server/sigil.node.v1.Node/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap()
}

/// The grpc-status of a response: from its headers (a trailers-only
/// response) or else its trailers.
async fn grpc_status(resp: hyper::Response<hyper::body::Incoming>) -> Option<i32> {
    let code = |h: &hyper::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    if let Some(c) = code(resp.headers()) {
        return Some(c);
    }
    let body = resp.into_body().collect().await.ok()?;
    body.trailers().and_then(code)
}

#[tokio::test]
async fn unauthenticated_large_declared_messages_are_refused_unread() {
    let server = crate::start("");
    let tls = server.tls(None).await;
    let pid = server.pid().unwrap();
    let before = rss_kib(pid);
    // The attack from the issue: no client certificate, 8 connections x 25
    // streams, each declaring a 32 MiB message and sending 1 MiB of it.
    let mut responses = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..8 {
        let mut send = raw_h2(&server, tls.clone()).await;
        for _ in 0..25 {
            send.ready().await.unwrap();
            let fut = send.send_request(declared("FetchBundle", 32 << 20, 1 << 20));
            responses.push(tokio::spawn(fut));
        }
        conns.push(send);
    }
    // Give the server time to read what was sent: the peak over a few
    // seconds, not an instant.
    let mut peak = before;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let grown_mib = peak.saturating_sub(before) / 1024;
    assert!(
        grown_mib < 48,
        "200 unauthenticated streams grew the server by {grown_mib} MiB"
    );
    for r in responses {
        let resp = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .expect("the server answers without waiting for the declared message")
            .unwrap()
            .unwrap();
        assert_eq!(grpc_status(resp).await, Some(Code::Unauthenticated as i32));
    }
    drop(conns);
}

/// One connection holds at most 64 streams: a 65th waits until one of them
/// ends (tonic's HTTP/2 default would have let 200 through).
#[tokio::test]
async fn a_connection_holds_at_most_64_streams() {
    // Attestations from one address are rate limited before streams are.
    let server = crate::start("[rate_limits]\nattest_burst = 1000.0\n");
    let tls = server.tls(None).await;
    let mut send = raw_h2(&server, tls).await;
    let mut held = Vec::new();
    for _ in 0..64 {
        send.ready().await.unwrap();
        // An Attest whose first message never arrives stays open until the
        // server's first-message timeout (10 s).
        held.push(tokio::spawn(send.send_request(declared("Attest", 100, 0))));
    }
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        send.ready().await.unwrap();
        send.send_request(declared("FetchBundle", 100, 0)).await
    })
    .await
    .expect("the 65th stream is answered once the first ones end");
    match outcome {
        // The client had not yet applied the server's limit, so it opened
        // the stream anyway: the server refuses it.
        Err(e) => assert!(format!("{e:?}").contains("REFUSED_STREAM"), "{e:?}"),
        // The client held it back until one of the 64 ended.
        Ok(resp) => {
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_secs(3),
                "a 65th stream was served after {waited:?}, while 64 were open"
            );
            assert_eq!(grpc_status(resp).await, Some(Code::Unauthenticated as i32));
        }
    }
    drop(held);
}

#[tokio::test]
async fn attest_declaring_a_large_message_is_cut_off() {
    let server = crate::start("");
    let mut send = raw_h2(&server, server.tls(None).await).await;
    // 2 MiB: under the service-wide gRPC limit (a full batch), far over
    // what an attestation needs.
    let resp = send.send_request(declared("Attest", 2 << 20, 1 << 20));
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        grpc_status(resp.await.unwrap()).await
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "an oversize attestation message is refused, not buffered until complete; log:\n{}",
            server.log()
        )
    });
    assert_eq!(status, Some(Code::ResourceExhausted as i32));
}

#[tokio::test]
async fn attest_without_parameters_times_out() {
    let server = crate::start("");
    let mut client = server.anonymous().await.unwrap();
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        let mut inbound = client
            .attest(tokio_stream::pending::<pb::AttestRequest>())
            .await?
            .into_inner();
        inbound.message().await
    })
    .await
    .expect("the server gives up on an attestation that sends nothing");
    let status = outcome.err().unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= Duration::from_secs(5), "{status:?}");
}

#[tokio::test]
async fn unauthenticated_connections_per_address_are_capped() {
    // The default cap is 64 connections per address without an agent SVID.
    let server = crate::start("");
    let tls = server.tls(None).await;
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }
    let handshake = || async {
        let tcp = tokio::net::TcpStream::connect(&server.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("sigil-server").unwrap();
        tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
    };
    let refused = tokio::time::timeout(Duration::from_secs(5), handshake())
        .await
        .expect("the 65th connection is closed at once, not left hanging");
    assert!(
        refused.is_err(),
        "the 65th connection from one address was served"
    );
    // Closed connections free their slots.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if handshake().await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "slots were not released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An agent's current SVID takes a connection out of its address's
/// unauthenticated count (many agents may share an address); a banned
/// agent's SVID does not, so a banned or leaked key cannot open
/// connections without limit.
#[tokio::test]
async fn a_banned_agents_certificate_counts_as_unauthenticated() {
    let server = crate::start("");
    let token = server.token().await.unwrap();
    let agent = SimAgent::join(&server, &token).await.unwrap();
    let tls = server.tls(Some(&agent)).await;
    let handshake = || async {
        let tcp = tokio::net::TcpStream::connect(&server.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("sigil-server").unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await?;
        // A refused connection is closed by the server: a read tells.
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => Err(std::io::Error::other("closed by the server")),
            _ => Ok(stream),
        }
    };
    // The agent in good standing: past the per-address cap of 64.
    let mut held = Vec::new();
    for i in 0..70 {
        let conn = handshake().await;
        assert!(conn.is_ok(), "connection {i} of a pinned agent was refused");
        held.push(conn);
    }
    drop(held);

    let out = server
        .cli(&["agent", "ban", "--id", agent.id.as_str()])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match handshake().await {
            Ok(conn) => held.push(conn),
            Err(_) => break,
        }
        assert!(
            held.len() <= 64 && Instant::now() < deadline,
            "a banned agent's certificate opened {} connections from one address",
            held.len()
        );
    }
    assert_eq!(held.len(), 64, "refused before the cap");
}

#[tokio::test]
async fn agents_keep_full_batches_but_small_calls_are_capped() {
    let server = crate::start("");
    let token = server.token().await.unwrap();
    let agent = SimAgent::join(&server, &token).await.unwrap();
    let mut client = agent.client(&server).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let one = csr(&key);
    // A full batch (1000 CSRs, far over the small-call limit) is read.
    let params: Vec<pb::SvidParams> = (0..1000)
        .map(|i| pb::SvidParams {
            entry_id: format!("{i:032x}"),
            csr: one.clone(),
        })
        .collect();
    let results = client
        .batch_new_x509_svid(pb::BatchNewX509SvidRequest { params })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 1000);
    // A RenewAgent carrying 1 MiB is refused before it is parsed.
    let err = client
        .renew_agent(pb::RenewAgentRequest {
            csr: vec![0; 1 << 20],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The agent still works.
    client
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn an_agent_is_pinned_to_its_certificate_not_its_serial() {
    // Upstream mode: the bundle is the operator's root, and anything that
    // root (or a sibling CA under it) signs chains to it.
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::default();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root_params
        .distinguished_name
        .push(DnType::CommonName, "Operator Root");
    root_params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    root_params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let root = root_params.self_signed(&root_key).unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, root.pem()).unwrap();
    std::fs::write(&key, root_key.serialize_pem()).unwrap();
    let server = crate::start(&format!(
        "[ca]\nupstream_cert = \"{}\"\nupstream_key = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    let token = server.token().await.unwrap();
    let agent = SimAgent::join(&server, &token).await.unwrap();

    // A certificate for the agent's ID with the agent's serial, minted by
    // another CA under the same root.
    let forged_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "forged");
    p.subject_alt_names = vec![SanType::URI(agent.id.as_str().try_into().unwrap())];
    p.serial_number = Some(SerialNumber::from_slice(&hex(&agent.serial)));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::minutes(30);
    let forged = p
        .signed_by(&forged_key, &Issuer::from_params(&root_params, &root_key))
        .unwrap();
    let leaf = sigil_identity::x509::parse(forged.der()).unwrap();
    assert_eq!(sigil_identity::x509::serial_hex(&leaf), agent.serial);
    let impostor = SimAgent::from_chain(
        forged_key.serialize_der(),
        vec![forged.der().to_vec()],
        agent.bundle.clone(),
    )
    .unwrap();
    assert_eq!((&impostor.id, &impostor.serial), (&agent.id, &agent.serial));
    let outcome = impostor
        .client(&server)
        .await
        .unwrap()
        .fetch_bundle(pb::FetchBundleRequest {})
        .await;
    let Err(err) = outcome else {
        panic!("a certificate with the agent's serial from another CA was accepted");
    };
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The real agent, and its renewal, still work.
    let mut client = agent.client(&server).await.unwrap();
    client
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap();
    let renewed = agent.renew(&mut client).await.unwrap();
    renewed
        .client(&server)
        .await
        .unwrap()
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap();
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn an_agent_holds_at_most_two_sync_streams() {
    let server = crate::start("");
    let token = server.token().await.unwrap();
    let agent = SimAgent::join(&server, &token).await.unwrap();
    let mut client = agent.client(&server).await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = client
            .sync(pb::SyncRequest { since_revision: 0 })
            .await
            .unwrap()
            .into_inner();
        // The snapshot: the stream is registered.
        s.message().await.unwrap().unwrap();
        streams.push(s);
    }
    let oldest = tokio::time::timeout(Duration::from_secs(10), streams[0].message())
        .await
        .expect("the oldest of three Sync streams is closed");
    let Err(err) = oldest else {
        panic!("the oldest stream went on");
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The two newest stay open.
    for s in &mut streams[1..] {
        assert!(
            tokio::time::timeout(Duration::from_millis(500), s.message())
                .await
                .is_err(),
            "a newer stream ended"
        );
    }
}
