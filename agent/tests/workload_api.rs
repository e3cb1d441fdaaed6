//! The Workload API served by the agent, called by the `spiffe` crate's
//! client (written by others, unmodified) and by a raw gRPC client for the
//! rules clients normally hide.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use common::Server;
use sigil_agent::workload_api::{self, WorkloadApi};
use sigil_attestors::unix::UnixAttestor;
use sigil_proto::admin;
use sigil_proto::node as node_pb;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::{JwtsvidRequest, X509svidRequest};
use tonic::Code;

struct Setup {
    server: Server,
    socket: std::path::PathBuf,
    agent_id: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn setup() -> Setup {
    let server = Server::start().await;
    let agent = server.start_agent().await;
    let agent_id = server.agent_id().await;
    let socket = server.dir.path().join("workload/api.sock");
    let listener = workload_api::bind(&socket).unwrap();
    let api = WorkloadApi::new(agent.clone(), Arc::new(UnixAttestor::default()));
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

async fn register(s: &Setup, path: &str, selector: &str) -> String {
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
        .create_entries(admin::CreateEntriesRequest { entries: vec![e] })
        .await
        .unwrap();
    r.into_inner().results[0].entry.as_ref().unwrap().id.clone()
}

fn with_header<T>(r: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(r);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

fn my_uid() -> u32 {
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
    let link = s.server.dir.path().join("link.sock");
    std::os::unix::fs::symlink(&s.socket, &link).unwrap();
    assert!(matches!(
        workload_api::bind(&link),
        Err(workload_api::SocketError::Symlink(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_from_one_uid_do_not_starve_another_uid() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup().await;
    register(&s, "mine", &format!("unix:uid:{}", my_uid())).await;
    register(&s, "nobody", "unix:uid:65534").await;

    // 1,000 stream attempts from this uid over 8 connections.
    let mut held = Vec::new();
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..8 {
        let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
        let mut raw = SpiffeWorkloadApiClient::new(channel);
        for _ in 0..125 {
            match raw.fetch_x509svid(with_header(X509svidRequest {})).await {
                Ok(stream) => {
                    opened += 1;
                    held.push(stream.into_inner());
                }
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    refused += 1;
                }
            }
        }
    }
    assert_eq!(opened, workload_api::DEFAULT_MAX_STREAMS_PER_UID);
    assert_eq!(refused, 1000 - workload_api::DEFAULT_MAX_STREAMS_PER_UID);

    // Another user is still served, through the real CLI, as uid 65534.
    let mut dir = s.socket.parent();
    while let Some(d) = dir {
        if d == std::path::Path::new("/tmp") || d == std::path::Path::new("/") {
            break;
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir = d.parent();
    }
    let out = tokio::task::spawn_blocking({
        let socket = s.socket.clone();
        move || {
            use std::os::unix::process::CommandExt;
            std::process::Command::new(env!("CARGO_BIN_EXE_sigil-agent"))
                .arg("--socket")
                .arg(&socket)
                .args(["api", "fetch", "x509"])
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/nobody"));

    // Closing streams frees the slots.
    held.clear();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
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

    s.server.stop().await;
    // The agent keeps serving what it holds.
    let during = client.fetch_x509_svid().await.unwrap();
    assert_eq!(during.spiffe_id(), before.spiffe_id());
    assert_eq!(during.leaf().as_bytes(), before.leaf().as_bytes());

    s.server.restart().await;
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
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/exit_race.py");
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
