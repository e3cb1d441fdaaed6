//! The Workload API served by the agent, called by the `spiffe` crate's
//! client (written by others, unmodified) and by a raw gRPC client for the
//! rules clients normally hide.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use crate::common::AgentTestServer as _;
use sigil_agent::workload_api::{self, WorkloadApi};
use sigil_attestors::unix::UnixAttestor;
use sigil_proto::admin;
use sigil_proto::node as node_pb;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::{JwtsvidRequest, X509svidRequest};
use sigil_tests::process::ServerProcess;
use tonic::Code;

pub(crate) struct Setup {
    pub(crate) server: ServerProcess,
    pub(crate) socket: std::path::PathBuf,
    pub(crate) agent_id: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub(crate) async fn setup() -> Setup {
    setup_with(Arc::new(UnixAttestor::default()), |api| api).await
}

/// Like [`setup`], with another attestor and settings.
pub(crate) async fn setup_with(
    attestor: Arc<UnixAttestor>,
    configure: impl FnOnce(WorkloadApi) -> WorkloadApi,
) -> Setup {
    setup_on(crate::common::start(""), attestor, configure).await
}

/// Like [`setup_with`], against `server` (started with other settings).
pub(crate) async fn setup_on(
    server: ServerProcess,
    attestor: Arc<UnixAttestor>,
    configure: impl FnOnce(WorkloadApi) -> WorkloadApi,
) -> Setup {
    let agent = server.start_agent().await;
    let agent_id = server.agent_id().await;
    let socket = server.dir().join("workload/api.sock");
    let listener = workload_api::bind(&socket).unwrap();
    let api = configure(WorkloadApi::new(agent.clone(), attestor));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_a, stop_b) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = rx.await;
        let _ = stop_a.send(true);
    });
    let mut b1 = stop_b.clone();
    tokio::spawn(agent.run(async move {
        let _ = b1.wait_for(|s| *s).await;
    }));
    let mut b2 = stop_b;
    tokio::spawn(workload_api::serve(api, listener, async move {
        let _ = b2.wait_for(|s| *s).await;
    }));
    Setup {
        server,
        socket,
        agent_id,
        _stop: tx,
    }
}

pub(crate) async fn register(s: &Setup, path: &str, selector: &str) -> String {
    let e = node_pb::Entry {
        spiffe_id: format!("spiffe://example.org/{path}"),
        parent_id: s.agent_id.clone(),
        selectors: vec![selector.into()],
        ..Default::default()
    };
    let r = s
        .server
        .admin()
        .await
        .unwrap()
        .create_entries(admin::CreateEntriesRequest { entries: vec![e] })
        .await
        .unwrap();
    r.into_inner().results[0].entry.as_ref().unwrap().id.clone()
}

pub(crate) fn with_header<T>(r: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(r);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

pub(crate) fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_fetches_x509_and_jwt_svids() {
    let s = setup().await;
    register(&s, "web", &format!("unix:uid:{}", my_uid())).await;
    register(&s, "other", "unix:uid:99999").await;
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", s.socket.display()))
        .await
        .unwrap();

    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/web",
        "only the entry matching this process"
    );
    let ctx = client.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.svids().len(), 1);
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(
        bundles
            .get(&spiffe::TrustDomain::new("example.org").unwrap())
            .is_some()
    );

    let token = client.fetch_jwt_token(["db"], None).await.unwrap();
    let validated = client.validate_jwt_token("db", &token).await.unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(
        jwt_bundles
            .get(&spiffe::TrustDomain::new("example.org").unwrap())
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_header_and_entitlement_rules() {
    let s = setup().await;
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);

    // No header.
    let err = raw.fetch_x509svid(X509svidRequest {}).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Wrong value, and duplicated.
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "yes".parse().unwrap());
    assert_eq!(
        raw.fetch_x509svid(req).await.err().unwrap().code(),
        Code::InvalidArgument
    );
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .append("workload.spiffe.io", "true".parse().unwrap());
    req.metadata_mut()
        .append("workload.spiffe.io", "true".parse().unwrap());
    assert_eq!(
        raw.fetch_x509svid(req).await.err().unwrap().code(),
        Code::InvalidArgument
    );

    // No entry for this process.
    let err = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    register(&s, "web", &format!("unix:uid:{}", my_uid())).await;
    // The entry reaches the agent over Sync from the server process; wait
    // until this process has its X.509 SVID before asking for JWTs.
    let mut synced = false;
    for _ in 0..200 {
        if raw
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .is_ok()
        {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(synced, "the entry did not reach the agent");
    // Audience is required; an unentitled SPIFFE ID is refused.
    let err = raw
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    let req = JwtsvidRequest {
        audience: vec!["db".into()],
        spiffe_id: "spiffe://example.org/admin".into(),
    };
    assert_eq!(
        raw.fetch_jwtsvid(with_header(req))
            .await
            .err()
            .unwrap()
            .code(),
        Code::PermissionDenied
    );
    let req = JwtsvidRequest {
        audience: vec!["db".into()],
        spiffe_id: "spiffe://example.org/web".into(),
    };
    let ok = raw
        .fetch_jwtsvid(with_header(req))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.svids[0].spiffe_id, "spiffe://example.org/web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_entry_ends_the_stream_with_permission_denied() {
    let s = setup().await;
    let id = register(&s, "web", &format!("unix:uid:{}", my_uid())).await;
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = raw.fetch_x509svid(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    let started = std::time::Instant::now();
    s.server
        .admin()
        .await
        .unwrap()
        .delete_entries(admin::DeleteEntriesRequest { ids: vec![id] })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap();
    let latency = started.elapsed();
    assert_eq!(end.err().map(|e| e.code()), Some(Code::PermissionDenied));
    println!("entry delete -> stream ended with PermissionDenied after {latency:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_directory_is_not_writable_by_workloads() {
    let s = setup().await;
    let dir = s.socket.parent().unwrap();
    let mode = std::fs::metadata(dir).unwrap().mode() & 0o777;
    assert_eq!(mode & 0o022, 0, "directory mode {mode:o}");
    // A symlink at the socket path is refused.
    let link = s.server.dir().join("link.sock");
    std::os::unix::fs::symlink(&s.socket, &link).unwrap();
    assert!(matches!(
        workload_api::bind(&link),
        Err(workload_api::SocketError::Symlink(_))
    ));
}

/// Issue 13 item 16: on a busy node many containers share one uid. With
/// default settings 1,000 concurrent streams from this uid, each on its own
/// connection as separate workloads would hold them, are all served, and a
/// new client (of this uid, and of another through the real CLI) still gets
/// its SVID within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_from_one_uid_do_not_starve_another_uid() {
    const STREAMS: usize = 1000;
    // Both ends of every connection live in this process.
    crate::common::raise_open_file_limit(4 * STREAMS as u64);
    let s = setup().await;
    register(&s, "mine", &format!("unix:uid:{}", my_uid())).await;
    register(&s, "nobody", "unix:uid:65534").await;

    let mut held = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
        let mut raw = SpiffeWorkloadApiClient::new(channel);
        let mut stream = match raw.fetch_x509svid(with_header(X509svidRequest {})).await {
            Ok(stream) => stream.into_inner(),
            Err(e) => panic!("stream {i} of {STREAMS} refused: {e:?}"),
        };
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.svids[0].spiffe_id, "spiffe://example.org/mine");
        held.push((raw, stream));
    }

    // A new client of the same uid, while all of them are open.
    let fresh = tokio::time::timeout(Duration::from_secs(1), async {
        let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
        let mut raw = SpiffeWorkloadApiClient::new(channel);
        let mut stream = raw
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap()
    })
    .await
    .expect("a new client waited more than a second");
    assert_eq!(fresh.svids[0].spiffe_id, "spiffe://example.org/mine");

    // Another user, through the real CLI, as uid 65534 (the time includes
    // starting the CLI).
    open_socket_dirs(&s.socket);
    let out = tokio::time::timeout(
        Duration::from_secs(1),
        cli_as_nobody(&s.socket, &["api", "fetch", "x509"]),
    )
    .await
    .expect("a client of another uid waited more than a second");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/nobody"));
    assert_eq!(held.len(), STREAMS, "all streams were still held");
}

/// The per-uid stream limit still applies when configured low, and closing
/// streams frees their slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_stream_limit_refuses_more_and_frees_slots_on_close() {
    let s = setup_with(Arc::new(UnixAttestor::default()), |api| {
        api.with_max_streams_per_uid(3)
    })
    .await;
    register(&s, "mine", &format!("unix:uid:{}", my_uid())).await;
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            raw.fetch_x509svid(with_header(X509svidRequest {}))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let err = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    held.clear();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        raw.fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused() {
    let s = setup().await;
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel).max_encoding_message_size(64 << 20);
    let huge = "a".repeat(10 * 1024 * 1024);
    let req = sigil_proto::workload::ValidateJwtsvidRequest {
        audience: "db".into(),
        svid: huge,
    };
    let err = raw.validate_jwtsvid(with_header(req)).await.err().unwrap();
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{err:?}"
    );
    // Just under the request limit, a garbage token is refused as invalid.
    let req = sigil_proto::workload::ValidateJwtsvidRequest {
        audience: "db".into(),
        svid: "a".repeat(20_000),
    };
    assert_eq!(
        raw.validate_jwtsvid(with_header(req))
            .await
            .err()
            .unwrap()
            .code(),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_health_service_answers_without_the_security_header() {
    use sigil_proto::grpc::health::v1::{HealthCheckRequest, health_client::HealthClient};
    let s = setup().await;
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut health = HealthClient::new(channel);
    for _ in 0..100 {
        let r = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if r.status == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = health
        .check(HealthCheckRequest {
            service: "SpiffeWorkloadAPI".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, 1, "SERVING");
    let err = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::NotFound);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_source_sees_a_rotation_and_jwt_source_mints() {
    let s = setup().await;
    let id = register(&s, "src", &format!("unix:uid:{}", my_uid())).await;
    let endpoint = format!("unix:{}", s.socket.display());
    let source = spiffe::X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    let first = source.svid().unwrap();
    assert_eq!(first.spiffe_id().to_string(), "spiffe://example.org/src");
    let mut updates = source.updated();
    let seen = updates.last();

    // Changing the entry makes the agent issue a new SVID; the open stream
    // under the source delivers it.
    let mut entry = s
        .server
        .admin()
        .await
        .unwrap()
        .list_entries(admin::ListEntriesRequest {
            id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .remove(0);
    entry.hint = "rotate".into();
    s.server
        .admin()
        .await
        .unwrap()
        .update_entry(admin::UpdateEntryRequest { entry: Some(entry) })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), updates.wait_for(|v| *v > seen))
        .await
        .unwrap()
        .unwrap();
    let second = source.svid().unwrap();
    assert_ne!(
        second.leaf().as_bytes(),
        first.leaf().as_bytes(),
        "a new certificate arrived"
    );
    source.shutdown().await;

    let jwt_source = spiffe::JwtSource::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    let token = jwt_source.fetch_jwt_svid(["db"]).await.unwrap();
    assert_eq!(token.spiffe_id().to_string(), "spiffe://example.org/src");
    let bundles = jwt_source.bundle_set().unwrap();
    assert!(
        bundles
            .get(&spiffe::TrustDomain::new("example.org").unwrap())
            .is_some()
    );
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let validated = client
        .validate_jwt_token("db", token.token())
        .await
        .unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/src"
    );
    jwt_source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_server_is_down_cached_svids_are_served_and_sync_resumes_after() {
    let mut s = setup().await;
    register(&s, "cached", &format!("unix:uid:{}", my_uid())).await;
    let endpoint = format!("unix:{}", s.socket.display());
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let before = client.fetch_x509_svid().await.unwrap();

    s.server.stop_async().await.unwrap();
    // The agent keeps serving what it holds.
    let during = client.fetch_x509_svid().await.unwrap();
    assert_eq!(during.spiffe_id(), before.spiffe_id());
    assert_eq!(during.leaf().as_bytes(), before.leaf().as_bytes());

    s.server.restart_async().await.unwrap();
    // Back: the agent reconnects (with its stored SVID, no re-attestation)
    // and a new entry reaches the workload.
    register(&s, "after", &format!("unix:uid:{}", my_uid())).await;
    let mut found = false;
    for _ in 0..200 {
        let all = client.fetch_all_x509_svids().await.unwrap();
        if all
            .iter()
            .any(|x| x.spiffe_id().to_string() == "spiffe://example.org/after")
        {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found, "sync resumed after the outage");
    let agents = s
        .server
        .admin()
        .await
        .unwrap()
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1, "no re-attestation");
}

/// The kernel names the process that connected; if that process is gone
/// when the request is attested (here: it forked, exited, and the child
/// sent the request), no SVID is given. The same request from the
/// connecting process itself gets one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_exited_before_attestation_gets_no_svid() {
    let s = setup().await;
    register(&s, "race", &format!("unix:uid:{}", my_uid())).await;
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/agent/interop/exit_race.py");
    let run = |mode: &'static str| {
        let socket = s.socket.clone();
        let script = script.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("python3")
                .arg(&script)
                .arg(&socket)
                .arg(mode)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        })
    };
    assert_eq!(
        run("direct").await.unwrap(),
        "svid",
        "control: the connecting process is served"
    );
    assert_eq!(
        run("after-exit").await.unwrap(),
        "none",
        "a gone process gets no SVID"
    );
}

/// Issue 13 item 15: the bundle maps are keyed by the trust domain's SPIFFE
/// ID, as the Workload API specification says (and SPIRE sends); a
/// malformed `spiffe_id` in FetchJWTSVID is InvalidArgument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_maps_are_keyed_by_spiffe_id_and_a_malformed_id_is_invalid() {
    use sigil_proto::workload::{JwtBundlesRequest, X509BundlesRequest};
    let s = setup().await;
    register(&s, "web", &format!("unix:uid:{}", my_uid())).await;
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);

    let x509 = raw
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let keys: Vec<_> = x509.bundles.keys().cloned().collect();
    assert_eq!(keys, ["spiffe://example.org"]);
    let jwt = raw
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let keys: Vec<_> = jwt.bundles.keys().cloned().collect();
    assert_eq!(keys, ["spiffe://example.org"]);
    let svid = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert!(
        svid.federated_bundles
            .keys()
            .all(|k| k.starts_with("spiffe://")),
        "{:?}",
        svid.federated_bundles.keys()
    );

    for bad in ["not a spiffe id", "spiffe://", "http://example.org/web"] {
        let err = raw
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["db".into()],
                spiffe_id: bad.into(),
            }))
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    // A well-formed ID the caller is not entitled to stays PermissionDenied.
    let err = raw
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: "spiffe://example.org/someone-else".into(),
        }))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

/// Issue 13 item 3: the `:authority` shim buffers at most one frame of the
/// size the server advertises (16 KiB). A connection announcing a 1 MiB
/// frame is closed when the frame header arrives, instead of being kept
/// open while up to 1 MiB is buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_larger_than_advertised_is_refused_at_its_header() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let mut conn = tokio::net::UnixStream::connect(&s.socket).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame, then the header of a 1 MiB DATA frame and a
    // little of its payload.
    conn.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    conn.write_all(&[0x10, 0, 0, 0x0, 0, 0, 0, 0, 1])
        .await
        .unwrap();
    conn.write_all(&[0u8; 100]).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // the server's SETTINGS and GOAWAY
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection with a 1 MiB frame in flight was kept open"
    );
}

/// Issue 13 item 7: attestation reads /proc; when that blocks (a hung file
/// system, here a FIFO nobody writes standing in for `/proc/<pid>/stat`),
/// only the callers it concerns wait: the accept loop and the runtime keep
/// serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_proc_read_does_not_stall_other_callers() {
    use std::os::unix::process::CommandExt;

    /// Lets the blocked reads finish (even when the test fails) so that
    /// the runtime can shut down: each opening of the FIFO for writing
    /// releases the readers waiting on it.
    struct Release(std::path::PathBuf);
    impl Drop for Release {
        fn drop(&mut self) {
            let fifo = self.0.clone();
            std::thread::spawn(move || {
                while std::fs::OpenOptions::new().write(true).open(&fifo).is_ok() {}
            });
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let root = tempfile::tempdir().unwrap();
    let proc_root = root.path().join("proc");
    std::fs::create_dir_all(&proc_root).unwrap();
    // This process (the stuck caller): its stat is a FIFO, so reading it
    // blocks in open().
    let me = proc_root.join(std::process::id().to_string());
    std::fs::create_dir(&me).unwrap();
    let fifo = me.join("stat");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let _release = Release(fifo.clone());
    let attestor = Arc::new(UnixAttestor::with_roots(
        &proc_root,
        "/etc",
        sigil_attestors::unix::DEFAULT_MAX_HASH_BYTES,
    ));
    let s = setup_with(attestor, |api| api).await;
    register(&s, "nobody", "unix:uid:65534").await;
    open_socket_dirs(&s.socket);

    // Many stuck callers: each connection's attestation blocks.
    let mut stuck = Vec::new();
    for _ in 0..40 {
        let socket = s.socket.clone();
        stuck.push(tokio::spawn(async move {
            let channel = sigil_proto::channel::unix_channel(&socket).await?;
            let mut raw = SpiffeWorkloadApiClient::new(channel);
            let _ = raw.fetch_x509svid(with_header(X509svidRequest {})).await;
            Ok::<_, sigil_proto::channel::ChannelError>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Another workload (uid 65534), started stopped so that its /proc
    // entry can be mapped to the real one before it connects.
    let child = std::process::Command::new("sh")
        .uid(65534)
        .gid(65534)
        .arg("-c")
        .arg("kill -STOP $$; exec \"$0\" --socket \"$1\" api fetch x509")
        .arg(sigil_tests::process::binary("sigil-agent").unwrap())
        .arg(&s.socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    for _ in 0..200 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('T'))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::os::unix::fs::symlink(format!("/proc/{pid}"), proc_root.join(pid.to_string())).unwrap();
    std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await
    .expect("another workload was not served while attestation of others hung")
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/nobody"));

    for t in stuck {
        t.abort();
    }
}

/// Makes the directories above the socket enterable by other users.
fn open_socket_dirs(socket: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut dir = socket.parent();
    while let Some(d) = dir {
        if d == std::path::Path::new("/tmp") || d == std::path::Path::new("/") {
            break;
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir = d.parent();
    }
}

/// Runs the real CLI as uid 65534 with `args`.
async fn cli_as_nobody(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    let socket = socket.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(sigil_tests::process::binary("sigil-agent").unwrap())
            .arg("--socket")
            .arg(&socket)
            .args(&args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Whether the agent closes `conn` within five seconds.
async fn closed_by_agent(conn: &mut tokio::net::UnixStream) -> bool {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Issue 13 item 3: connections are counted per uid and in total; past a
/// limit a new connection is closed at once, other uids are still served
/// under the per-uid limit, and closing connections frees their slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limits_are_closed() {
    use tokio::io::AsyncWriteExt;
    let s = setup_with(Arc::new(UnixAttestor::default()), |api| {
        api.with_max_connections(100, 3)
    })
    .await;
    register(&s, "mine", &format!("unix:uid:{}", my_uid())).await;
    register(&s, "nobody", "unix:uid:65534").await;
    open_socket_dirs(&s.socket);
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = tokio::net::UnixStream::connect(&s.socket).await.unwrap();
        c.write_all(preface).await.unwrap();
        held.push(c);
    }
    let mut fourth = tokio::net::UnixStream::connect(&s.socket).await.unwrap();
    let _ = fourth.write_all(preface).await;
    assert!(
        closed_by_agent(&mut fourth).await,
        "a fourth connection of this uid was kept"
    );
    let out = cli_as_nobody(&s.socket, &["api", "fetch", "x509"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/nobody"),
        "another uid is served: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    assert!(
        raw.fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .is_ok(),
        "a freed slot is used again"
    );

    // The limit in all applies across uids.
    let s = setup_with(Arc::new(UnixAttestor::default()), |api| {
        api.with_max_connections(2, 100)
    })
    .await;
    register(&s, "nobody", "unix:uid:65534").await;
    open_socket_dirs(&s.socket);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::UnixStream::connect(&s.socket).await.unwrap();
        c.write_all(preface).await.unwrap();
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = cli_as_nobody(&s.socket, &["api", "fetch", "x509"]).await;
    assert!(
        !out.status.success(),
        "a third connection in all was served"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = cli_as_nobody(&s.socket, &["api", "fetch", "x509"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 13 item 7: unary calls are rate-limited per uid; another uid has
/// its own budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_are_rate_limited_per_uid() {
    let s = setup_with(Arc::new(UnixAttestor::default()), |api| {
        api.with_unary_calls_per_uid_per_second(5)
    })
    .await;
    register(&s, "mine", &format!("unix:uid:{}", my_uid())).await;
    register(&s, "nobody", "unix:uid:65534").await;
    open_socket_dirs(&s.socket);
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let mut codes = Vec::new();
    for _ in 0..8 {
        let req = sigil_proto::workload::ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: "not.a.jwt".into(),
        };
        codes.push(
            raw.validate_jwtsvid(with_header(req))
                .await
                .unwrap_err()
                .code(),
        );
    }
    assert!(
        codes
            .iter()
            .filter(|c| **c == Code::ResourceExhausted)
            .count()
            >= 2,
        "{codes:?}"
    );
    assert_eq!(codes[0], Code::InvalidArgument);
    let err = raw
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let out = cli_as_nobody(&s.socket, &["api", "fetch", "jwt", "--audience", "db"]).await;
    assert!(
        out.status.success(),
        "another uid has its own budget: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
