//! Envoy SDS served by the agent on the Workload API socket, called by a
//! tonic client built from Envoy's published protos (`envoy-types`), with
//! no `workload.spiffe.io` header (SDS clients send none).

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, SpiffeCertValidatorConfig, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc;
use prost::Message;
use sigil_agent::workload_api::sds::SECRET_TYPE_URL;
use sigil_proto::admin;
use sigil_proto::workload::X509svidRequest;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::workload_api::{Setup, my_uid, register, setup, setup_with};

pub(crate) async fn sds_client(s: &Setup) -> SecretDiscoveryServiceClient<Channel> {
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    SecretDiscoveryServiceClient::new(channel)
}

fn request(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    }
}

fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
    assert_eq!(r.type_url, SECRET_TYPE_URL);
    assert!(!r.version_info.is_empty(), "every response has a version");
    assert!(!r.nonce.is_empty(), "every response has a nonce");
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE_URL);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn inline_text(d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> String {
    match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// The CA certificates of a SPIFFE validator trust bundle, without the
/// PEM `X509 CRL` blocks the agent appends (one per CA, or none while a CA
/// has no CRL yet: Envoy checks every CA of a chain once any CRL is there).
fn certificates_of_trust_bundle(text: &str) -> String {
    let (certs, crls) = text
        .find("-----BEGIN X509 CRL-----")
        .map_or((text, ""), |at| text.split_at(at));
    let cas = certs.matches("-----BEGIN CERTIFICATE-----").count();
    let crl_blocks = crls.matches("-----BEGIN X509 CRL-----").count();
    assert!(
        crl_blocks == 0 || crl_blocks == cas,
        "{crl_blocks} CRLs for {cas} CAs: one per CA or none"
    );
    assert_eq!(
        crls.matches("-----BEGIN CERTIFICATE-----").count(),
        0,
        "CRLs come after every certificate"
    );
    certs.to_owned()
}

/// The URI SAN of the leaf of a TLS certificate secret, and its serial.
pub(crate) fn leaf_of(s: &Secret) -> (String, Vec<u8>) {
    let Some(secret::Type::TlsCertificate(tls)) = &s.r#type else {
        panic!("{} is not a TLS certificate", s.name);
    };
    let key = inline_text(&tls.private_key);
    assert!(
        key.starts_with("-----BEGIN PRIVATE KEY-----"),
        "the key is PKCS#8 PEM"
    );
    let chain = inline_text(&tls.certificate_chain);
    let first = chain
        .split("-----END CERTIFICATE-----")
        .next()
        .unwrap()
        .to_owned()
        + "-----END CERTIFICATE-----\n";
    let (_, pem) = x509_parser::pem::parse_x509_pem(first.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let uri = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .unwrap();
    (uri, cert.raw_serial().to_vec())
}

fn trusted_ca(s: &Secret) -> String {
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("{} is not a validation context", s.name);
    };
    inline_text(&v.trusted_ca)
}

/// Waits until the agent serves this process an identity (the entry
/// reaches it over Sync from the server process).
pub(crate) async fn wait_for_identity(s: &Setup) {
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    for _ in 0..400 {
        let mut req = tonic::Request::new(X509svidRequest {});
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        if raw.fetch_x509svid(req).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the entry did not reach the agent");
}

/// Changes entry `id`'s hint, which makes the agent issue a new SVID.
pub(crate) async fn rotate(s: &Setup, id: &str, hint: &str) {
    let mut admin = s.server.admin().await.unwrap();
    let mut entry = admin
        .list_entries(admin::ListEntriesRequest {
            id: id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .remove(0);
    entry.hint = hint.into();
    admin
        .update_entry(admin::UpdateEntryRequest { entry: Some(entry) })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_secrets_serves_default_by_id_rootca_and_all() {
    let s = setup().await;
    register(&s, "web", &format!("unix:uid:{}", my_uid())).await;
    register(&s, "other", "unix:uid:99999").await;
    wait_for_identity(&s).await;
    let mut sds = sds_client(&s).await;
    let bundle_pem = s.server.bundle().await.unwrap().x509_pem();

    // No workload.spiffe.io header on any of these.
    for name in ["default", "spiffe://example.org/web"] {
        let r = sds
            .fetch_secrets(request(&[name]))
            .await
            .unwrap()
            .into_inner();
        let got = secrets(&r);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, name, "the secret carries the name asked for");
        assert_eq!(leaf_of(&got[0]).0, "spiffe://example.org/web");
    }
    for name in ["ROOTCA", "spiffe://example.org"] {
        let r = sds
            .fetch_secrets(request(&[name]))
            .await
            .unwrap()
            .into_inner();
        let got = secrets(&r);
        assert_eq!(got[0].name, name);
        assert_eq!(trusted_ca(&got[0]), bundle_pem, "the trust domain's bundle");
    }

    let r = sds
        .fetch_secrets(request(&["ALL"]))
        .await
        .unwrap()
        .into_inner();
    let got = secrets(&r);
    let Some(secret::Type::ValidationContext(v)) = &got[0].r#type else {
        panic!("ALL is a validation context");
    };
    assert!(v.trusted_ca.is_none(), "ALL uses the SPIFFE validator only");
    let validator = v.custom_validator_config.as_ref().unwrap();
    assert_eq!(validator.name, "envoy.tls.cert_validator.spiffe");
    let any = validator.typed_config.as_ref().unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    );
    let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
    assert_eq!(
        config.trust_domains.len(),
        1,
        "only its own trust domain today"
    );
    assert_eq!(config.trust_domains[0].name, "example.org", "no scheme");
    assert_eq!(
        certificates_of_trust_bundle(&inline_text(&config.trust_domains[0].trust_bundle)),
        bundle_pem
    );

    // Several names at once, in order; none means everything it may have.
    let r = sds
        .fetch_secrets(request(&["ROOTCA", "default"]))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = secrets(&r).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["ROOTCA", "default"]);
    let r = sds.fetch_secrets(request(&[])).await.unwrap().into_inner();
    let names: Vec<_> = secrets(&r).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["spiffe://example.org/web", "spiffe://example.org"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_unauthorized_names_are_invalid_arguments() {
    let s = setup().await;
    let mut sds = sds_client(&s).await;
    // No identity at all: refused like the Workload API refuses.
    let err = sds.fetch_secrets(request(&["default"])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    register(&s, "web", &format!("unix:uid:{}", my_uid())).await;
    register(&s, "other", "unix:uid:99999").await;
    wait_for_identity(&s).await;
    for names in [
        &["nope"][..],
        &["spiffe://example.org/other"],
        &["default", "spiffe://example.org/other"],
        &["spiffe://elsewhere.org"],
    ] {
        let err = sds.fetch_secrets(request(names)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{names:?}");
        assert!(
            err.message().contains("not authorized"),
            "{}",
            err.message()
        );

        let (tx, rx) = mpsc::channel(4);
        tx.send(request(names)).await.unwrap();
        let mut stream = sds
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let err = stream.message().await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "stream {names:?}");
    }
    // Another resource type, and incremental SDS.
    let mut wrong = request(&["default"]);
    wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let err = sds.fetch_secrets(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let (_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let err = sds
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

/// Asserts nothing arrives on `stream` for a while.
async fn quiet(stream: &mut tonic::Streaming<DiscoveryResponse>) {
    let r = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(r.is_err(), "nothing is sent, got {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_handle_ack_nack_and_push_every_rotation() {
    let s = setup().await;
    let id = register(&s, "web", &format!("unix:uid:{}", my_uid())).await;
    wait_for_identity(&s).await;
    let mut sds = sds_client(&s).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(request(&["default"])).await.unwrap();
    let mut stream = sds
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let (uri, serial1) = leaf_of(&secrets(&first)[0]);
    assert_eq!(uri, "spiffe://example.org/web");

    // An ACK (the version and nonce back, same names) sends nothing.
    let ack = |r: &DiscoveryResponse, names: &[&str]| DiscoveryRequest {
        version_info: r.version_info.clone(),
        response_nonce: r.nonce.clone(),
        ..request(names)
    };
    tx.send(ack(&first, &["default"])).await.unwrap();
    quiet(&mut stream).await;
    // A NACK is logged, and nothing is sent either.
    tx.send(DiscoveryRequest {
        error_detail: Some(rpc::Status {
            code: 3,
            message: "test: rejected".into(),
            details: vec![],
        }),
        ..ack(&first, &["default"])
    })
    .await
    .unwrap();
    quiet(&mut stream).await;

    // New names with the current nonce: answered at once.
    tx.send(ack(&first, &["default", "ROOTCA"])).await.unwrap();
    let second = stream.message().await.unwrap().unwrap();
    let names: Vec<_> = secrets(&second).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["default", "ROOTCA"]);
    assert_ne!(second.version_info, first.version_info);
    assert_ne!(second.nonce, first.nonce);
    // A request answering an older response is stale: ignored.
    tx.send(ack(&first, &["ALL"])).await.unwrap();
    quiet(&mut stream).await;
    tx.send(ack(&second, &["default", "ROOTCA"])).await.unwrap();

    // Each rotation is pushed, with a new version and nonce.
    let mut last = second;
    let mut serial = serial1;
    for hint in ["rotate-1", "rotate-2"] {
        rotate(&s, &id, hint).await;
        let pushed = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a rotation is pushed")
            .unwrap()
            .unwrap();
        let got = secrets(&pushed);
        let (uri, next) = leaf_of(&got[0]);
        assert_eq!(uri, "spiffe://example.org/web");
        assert_ne!(next, serial, "a new certificate");
        assert_eq!(got[1].name, "ROOTCA");
        assert_ne!(pushed.version_info, last.version_info);
        assert_ne!(pushed.nonce, last.nonce);
        tx.send(ack(&pushed, &["default", "ROOTCA"])).await.unwrap();
        serial = next;
        last = pushed;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_streams_count_against_the_uids_stream_limit() {
    let s = setup_with(
        std::sync::Arc::new(sigil_attestors::unix::UnixAttestor::default()),
        |api| api.with_max_streams_per_uid(1),
    )
    .await;
    register(&s, "web", &format!("unix:uid:{}", my_uid())).await;
    wait_for_identity(&s).await;
    let mut sds = sds_client(&s).await;
    // The Workload API stream `wait_for_identity` opened gives its place
    // back once the agent sees it closed.
    let mut opened = None;
    for _ in 0..100 {
        let (tx, rx) = mpsc::channel(4);
        tx.send(request(&["default"])).await.unwrap();
        match sds.stream_secrets(ReceiverStream::new(rx)).await {
            Ok(stream) => {
                opened = Some((tx, stream.into_inner()));
                break;
            }
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (tx, mut held) = opened.expect("the one stream a uid may have opens");
    held.message().await.unwrap().unwrap();

    let (tx2, rx2) = mpsc::channel(4);
    tx2.send(request(&["default"])).await.unwrap();
    let err = sds
        .stream_secrets(ReceiverStream::new(rx2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let channel = sigil_proto::channel::unix_channel(&s.socket).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let err = raw.fetch_x509svid(req).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::ResourceExhausted,
        "Workload API streams share the limit"
    );

    // Closing the SDS stream frees its place.
    drop(held);
    drop(tx);
    let mut freed = false;
    for _ in 0..100 {
        let (tx3, rx3) = mpsc::channel(4);
        tx3.send(request(&["default"])).await.unwrap();
        if sds.stream_secrets(ReceiverStream::new(rx3)).await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(freed, "the stream's place was not given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closed_its_side_still_gets_rotations() {
    let s = setup().await;
    let id = register(&s, "web", &format!("unix:uid:{}", my_uid())).await;
    wait_for_identity(&s).await;
    let mut sds = sds_client(&s).await;
    // One request, then the request stream ends (HTTP/2 half-close).
    let mut stream = sds
        .stream_secrets(tokio_stream::iter(vec![request(&["default"])]))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let (_, serial) = leaf_of(&secrets(&first)[0]);
    rotate(&s, &id, "after-close").await;
    let pushed = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a rotation is pushed")
        .unwrap()
        .unwrap();
    assert_ne!(leaf_of(&secrets(&pushed)[0]).1, serial);
}

/// The certificates of the `ALL` secret's SPIFFE validator, per trust domain.
fn all_bundles(s: &Secret) -> Vec<(String, String)> {
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("{} is not a validation context", s.name);
    };
    let typed = v
        .custom_validator_config
        .as_ref()
        .and_then(|c| c.typed_config.as_ref())
        .expect("ALL carries the SPIFFE validator");
    let config = SpiffeCertValidatorConfig::decode(typed.value.as_slice()).unwrap();
    config
        .trust_domains
        .iter()
        .map(|td| {
            let text = inline_text(&td.trust_bundle);
            (td.name.clone(), certificates_of_trust_bundle(&text))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_bundle_change_pushes_rootca_and_all_once() {
    use sigil_tests::process::{ServerOptions, ServerProcess};

    // A 60 s CA: the next CA is prepared and published at half its life.
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &ServerOptions {
            ca_ttl: Some(Duration::from_secs(60)),
            agent_svid_ttl: Some(Duration::from_secs(30)),
            ..Default::default()
        },
    )
    .unwrap();
    let s = crate::workload_api::setup_on(
        server,
        std::sync::Arc::new(sigil_attestors::unix::UnixAttestor::default()),
        |api| api,
    )
    .await;
    register(&s, "web", &format!("unix:uid:{}", my_uid())).await;
    wait_for_identity(&s).await;
    let mut sds = sds_client(&s).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(request(&["ROOTCA", "ALL"])).await.unwrap();
    let mut stream = sds
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let got = secrets(&first);
    assert_eq!(got[0].name, "ROOTCA");
    assert_eq!(got[1].name, "ALL");
    let rootca = trusted_ca(&got[0]);
    assert_eq!(rootca.matches("BEGIN CERTIFICATE").count(), 1, "one CA");
    assert_eq!(
        all_bundles(&got[1]),
        [("example.org".to_owned(), rootca.clone())]
    );
    let ack = |r: &DiscoveryResponse| DiscoveryRequest {
        version_info: r.version_info.clone(),
        response_nonce: r.nonce.clone(),
        ..request(&["ROOTCA", "ALL"])
    };
    tx.send(ack(&first)).await.unwrap();

    // The next CA's certificate reaches the bundle: one push of both. A
    // push before it may only bring CRLs (the CA's first CRL), never the
    // same content again.
    let mut acked = first;
    let pushed = loop {
        let pushed = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("the bundle change is pushed")
            .unwrap()
            .unwrap();
        assert_ne!(pushed.version_info, acked.version_info);
        assert_ne!(pushed.nonce, acked.nonce);
        assert_ne!(pushed.resources, acked.resources, "a push only on change");
        let got = secrets(&pushed);
        assert_eq!(got[0].name, "ROOTCA");
        assert_eq!(got[1].name, "ALL");
        tx.send(ack(&pushed)).await.unwrap();
        if trusted_ca(&got[0]).matches("BEGIN CERTIFICATE").count() == 2 {
            break pushed;
        }
        assert_eq!(trusted_ca(&got[0]), rootca, "a CRL-only push keeps the CA");
        acked = pushed;
    };
    let got = secrets(&pushed);
    let next = trusted_ca(&got[0]);
    assert!(next.contains(rootca.trim_end()), "the current CA stays");
    assert_eq!(
        all_bundles(&got[1]),
        [("example.org".to_owned(), next.clone())]
    );
    // Its ACK causes no push of the same content; only a CRL of the new CA
    // may still follow.
    let mut acked = pushed;
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        let later = r.unwrap().unwrap();
        assert_ne!(later.resources, acked.resources, "a push only on change");
        let got = secrets(&later);
        assert_eq!(trusted_ca(&got[0]), next, "only CRLs change");
        tx.send(ack(&later)).await.unwrap();
        acked = later;
    }
}
