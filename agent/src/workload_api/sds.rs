//! Envoy's Secret Discovery Service (SDS v3,
//! `envoy.service.secret.v3.SecretDiscoveryService`) on the Workload API
//! socket, so an Envoy sidecar takes its identity from the agent.
//!
//! Callers are attested exactly as Workload API callers (same attestors,
//! same per-uid stream limits, updates re-attested before they are sent),
//! but SDS requests carry no `workload.spiffe.io` header.
//!
//! Resources, by the name Envoy asks for:
//! - an entry's SPIFFE ID, or [`SdsConfig::default_svid_name`] (the first
//!   identity): a `TlsCertificate`, chain and PKCS#8 key as inline PEM;
//! - a trust domain's ID (`spiffe://example.org`), or
//!   [`SdsConfig::default_bundle_name`] for the workload's own: a validation
//!   context whose `trusted_ca` is that trust domain's bundle;
//! - [`SdsConfig::default_all_bundles_name`]: one validation context with
//!   the SPIFFE certificate validator (`envoy.tls.cert_validator.spiffe`)
//!   holding every trust domain the workload may trust.
//!
//! No resource names means every SVID and bundle under its own name. A name
//! the workload may not have (unknown, or another workload's) fails the
//! request with `InvalidArgument`. Resource names are only compared with
//! the workload's own names (a SPIFFE ID is not even parsed), so the only
//! untrusted bytes parsed are prost's; the `sds` fuzz target feeds
//! arbitrary bytes through [`handle_request`] all the same.
//!
//! Streams: every response has a version and a nonce (a counter of the
//! stream); a request that carries the last nonce is an ACK (nothing is
//! sent unless the names changed) or, with `error_detail`, a NACK (logged);
//! a request with an older nonce is stale and ignored. Every rotation or
//! bundle change that alters what the stream asked for is pushed.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, TypedExtensionConfig, data_source::Specifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate,
    certificate_validation_context::TrustChainVerification, secret,
    spiffe_cert_validator_config::TrustDomain as EnvoyTrustDomain,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use sigil_identity::Bundle;
use sigil_identity::SelectorSet;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::caller::{Caller, Recheck};
use super::{BoxStream, MAX_REQUEST_BYTES, WorkloadApi};
use crate::cache::CachedSvid;
pub use crate::config::SdsConfig;

/// The type of every resource served.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Envoy's name for its SPIFFE certificate validator extension.
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
const SPIFFE_VALIDATOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// Most resource names one request may list (Envoy asks for one or two).
pub const MAX_RESOURCE_NAMES: usize = 64;

/// What one workload may be given.
#[derive(Debug, Clone)]
pub struct View {
    /// Its SVIDs, in entry order (the first is the default).
    pub svids: Vec<Arc<CachedSvid>>,
    /// The bundles of every trust domain it may trust, its own first.
    /// Federated trust domains are appended here when the agent has them.
    pub trusted: Vec<Arc<Bundle>>,
    /// The CRLs of its own trust domain (`trusted[0]`), appended to that
    /// bundle as PEM `X509 CRL` blocks (see `crate::crl::CrlSet::bundle_pem`).
    pub crls: Arc<crate::crl::CrlSet>,
}

/// The PEM trust bundle of `b`: with the CRLs when `b` is the workload's
/// own trust domain's.
fn trust_pem(b: &Bundle, view: &View) -> String {
    match view.trusted.first() {
        Some(own) if own.trust_domain == b.trust_domain => view.crls.bundle_pem(b),
        _ => b.x509_pem(),
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
        ..Default::default()
    })
}

fn tls_secret(name: &str, svid: &CachedSvid) -> Secret {
    let chain: String = svid
        .chain
        .iter()
        .map(|der| sigil_identity::pem::encode("CERTIFICATE", der))
        .collect();
    let key = sigil_identity::pem::encode("PRIVATE KEY", &svid.key);
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain.into_bytes()),
            private_key: inline(key.into_bytes()),
            ..Default::default()
        })),
    }
}

fn bundle_secret(name: &str, bundle: &Bundle, view: &View) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle.x509_pem().into_bytes()),
                // Envoy's default validator: CRLs for every CA or none.
                crl: view
                    .trusted
                    .first()
                    .filter(|own| own.trust_domain == bundle.trust_domain)
                    .filter(|_| view.crls.covers(bundle))
                    .and_then(|_| inline(view.crls.pem().into_bytes())),
                ..Default::default()
            },
        )),
    }
}

fn all_bundles_secret(name: &str, view: &View) -> Secret {
    let config = SpiffeCertValidatorConfig {
        trust_domains: view
            .trusted
            .iter()
            .map(|b| EnvoyTrustDomain {
                name: b.trust_domain.as_str().to_owned(),
                // Envoy's SPIFFE validator reads `X509 CRL` blocks here.
                trust_bundle: inline(trust_pem(b, view).into_bytes()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trust_chain_verification: TrustChainVerification::VerifyTrustChain as i32,
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR.to_owned(),
                    typed_config: Some(Any {
                        type_url: SPIFFE_VALIDATOR_TYPE_URL.to_owned(),
                        value: config.encode_to_vec(),
                    }),
                }),
                ..Default::default()
            },
        )),
    }
}

/// The secret named `name` for a workload that may have `view`; `None` if
/// it may not (or no such thing exists).
fn resolve_one(name: &str, view: &View, names: &SdsConfig) -> Option<Secret> {
    if name == names.default_svid_name {
        return view.svids.first().map(|s| tls_secret(name, s));
    }
    if name == names.default_bundle_name {
        return view.trusted.first().map(|b| bundle_secret(name, b, view));
    }
    if name == names.default_all_bundles_name {
        return (!view.trusted.is_empty()).then(|| all_bundles_secret(name, view));
    }
    if let Some(s) = view
        .svids
        .iter()
        .find(|s| s.entry.spiffe_id.as_str() == name)
    {
        return Some(tls_secret(name, s));
    }
    view.trusted
        .iter()
        .find(|b| b.trust_domain.id().as_str() == name)
        .map(|b| bundle_secret(name, b, view))
}

/// The secrets `requested` names, in order; every SVID and trust bundle if
/// none is named. `InvalidArgument` if any is not the workload's.
pub fn resolve(
    requested: &[String],
    view: &View,
    names: &SdsConfig,
) -> Result<Vec<Secret>, Status> {
    if requested.is_empty() {
        let svids = view
            .svids
            .iter()
            .map(|s| tls_secret(s.entry.spiffe_id.as_str(), s));
        let bundles = view
            .trusted
            .iter()
            .map(|b| bundle_secret(b.trust_domain.id().as_str(), b, view));
        return Ok(svids.chain(bundles).collect());
    }
    requested
        .iter()
        .map(|name| {
            resolve_one(name, view, names).ok_or_else(|| {
                Status::invalid_argument(
                    "workload is not authorized for the requested identities (an unknown SDS \
                     resource name, or one that is not this workload's)",
                )
            })
        })
        .collect()
}

/// Checks a request's type and resource names, and returns the names (once
/// each, in order).
fn requested_names(req: &DiscoveryRequest) -> Result<Vec<String>, Status> {
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
        return Err(Status::invalid_argument(format!(
            "this SDS server serves only {SECRET_TYPE_URL}"
        )));
    }
    if req.resource_names.len() > MAX_RESOURCE_NAMES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_RESOURCE_NAMES} resource names per request"
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(req.resource_names.len());
    for n in &req.resource_names {
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    Ok(out)
}

/// The secrets one request asks for, for a workload that may have `view`.
pub fn handle_request(
    req: &DiscoveryRequest,
    view: &View,
    names: &SdsConfig,
) -> Result<Vec<Secret>, Status> {
    resolve(&requested_names(req)?, view, names)
}

fn response(secrets: &[Secret], version: String, nonce: String) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version,
        resources: secrets
            .iter()
            .map(|s| Any {
                type_url: SECRET_TYPE_URL.to_owned(),
                value: s.encode_to_vec(),
            })
            .collect(),
        type_url: SECRET_TYPE_URL.to_owned(),
        nonce,
        ..Default::default()
    }
}

/// The SDS service, sharing the Workload API's caller checks and limits.
#[derive(Debug, Clone)]
pub struct Sds {
    api: WorkloadApi,
}

impl Sds {
    /// SDS for the callers of `api`, with `api`'s resource names.
    pub fn new(api: WorkloadApi) -> Self {
        Self { api }
    }

    /// The gRPC service, refusing requests larger than the Workload API's.
    pub fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// What a workload with `selectors` may have now.
    fn view(&self, selectors: &SelectorSet) -> Result<View, Status> {
        let (entries, svids) = self.api.identities(selectors);
        if entries.is_empty() {
            return Err(self
                .api
                .no_identity("no identity is registered for this workload"));
        }
        // Federated trust domains named by `entries` go after this one.
        let mut trusted = vec![self.api.bundle()?];
        trusted.extend(
            self.api
                .session
                .cache()
                .federated_for(entries.iter().map(|e| &**e)),
        );
        Ok(View {
            svids,
            trusted,
            crls: self.api.session.cache().crls(),
        })
    }
}

/// Where a stream stands: what Envoy asked for and what it was last sent.
#[derive(Default)]
struct StreamState {
    names: Option<Vec<String>>,
    sent: Option<Vec<Secret>>,
    responses: u64,
}

impl StreamState {
    fn nonce(&self) -> String {
        format!("{:08x}", self.responses)
    }

    /// The next response, carrying `secrets`.
    fn next(&mut self, secrets: Vec<Secret>) -> DiscoveryResponse {
        self.responses += 1;
        let r = response(&secrets, self.responses.to_string(), self.nonce());
        self.sent = Some(secrets);
        r
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "incremental SDS is not served; use StreamSecrets (api_type GRPC)",
        ))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let Caller {
            uid,
            selectors,
            pid,
            origin,
        } = self.api.attest(&req).await?;
        let slot = self.api.open_stream(uid)?;
        self.api.x509_state(&selectors).await?;
        let recheck = Recheck { uid, pid, origin };
        let mut requests = req.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let mut changes = self.api.session.cache().subscribe();
        tokio::spawn(async move {
            let _slot = slot;
            let mut st = StreamState::default();
            // A client that closed its side still gets updates.
            let mut reading = true;
            loop {
                let secrets = tokio::select! {
                    () = tx.closed() => return,
                    msg = requests.message(), if reading => {
                        let r = match msg {
                            Ok(Some(r)) => r,
                            Ok(None) => {
                                reading = false;
                                continue;
                            }
                            Err(e) => {
                                debug!(error = %e, "SDS stream ended by the client");
                                return;
                            }
                        };
                        match this.on_request(&mut st, &r, &selectors) {
                            Ok(Some(secrets)) => secrets,
                            Ok(None) => continue,
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        }
                    }
                    r = changes.changed() => {
                        if r.is_err() {
                            return;
                        }
                        let Some(names) = st.names.clone() else { continue };
                        let view = match this.view(&selectors) {
                            Ok(v) => v,
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        };
                        match resolve(&names, &view, &this.api.sds) {
                            Ok(secrets) if st.sent.as_ref() != Some(&secrets) => secrets,
                            Ok(_) => continue,
                            // A name may be missing for a moment (an SVID
                            // being issued again): keep what Envoy has.
                            Err(_) => continue,
                        }
                    }
                };
                // Only the process that opened the stream gets updates.
                if st.responses > 0
                    && let Err(status) = this.api.recheck(&recheck).await
                {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let response = st.next(secrets);
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        self.api.unary_allowed(&req)?;
        let Caller { selectors, .. } = self.api.attest(&req).await?;
        self.api.x509_state(&selectors).await?;
        let view = self.view(&selectors)?;
        let secrets = handle_request(req.get_ref(), &view, &self.api.sds)?;
        let revision = self.api.session.cache().revision();
        Ok(Response::new(response(
            &secrets,
            revision.to_string(),
            format!("{revision:08x}"),
        )))
    }
}

impl Sds {
    /// Handles one request on a stream: the secrets to send, or `None`
    /// (an ACK, a NACK, a stale request).
    fn on_request(
        &self,
        st: &mut StreamState,
        r: &DiscoveryRequest,
        selectors: &SelectorSet,
    ) -> Result<Option<Vec<Secret>>, Status> {
        let names = requested_names(r)?;
        if !r.response_nonce.is_empty() && r.response_nonce != st.nonce() {
            debug!(nonce = %r.response_nonce, "stale SDS request ignored");
            return Ok(None);
        }
        if let Some(e) = &r.error_detail {
            warn!(
                nonce = %r.response_nonce,
                version = %r.version_info,
                resources = ?names,
                code = e.code,
                error = %e.message,
                "Envoy rejected the secrets sent (NACK); it keeps the previous ones"
            );
            return Ok(None);
        }
        if !r.response_nonce.is_empty() && st.names.as_ref() == Some(&names) {
            debug!(version = %r.version_info, "SDS response acknowledged");
            return Ok(None);
        }
        let secrets = resolve(&names, &self.view(selectors)?, &self.api.sds)?;
        st.names = Some(names);
        Ok(Some(secrets))
    }
}
