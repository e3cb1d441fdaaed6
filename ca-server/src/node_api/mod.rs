//! The node API (`sigil.node.v1`): attestation, agent renewal, the Sync
//! stream, and SVID issuance for authorized entries.
//!
//! Every call but `Attest` authenticates the agent by the SVID it presented
//! in the TLS handshake, pinned to the certificate the server last issued
//! it (SHA-256 of the DER; or the renewal in flight). Errors tell the agent
//! little; the log says more. What is read before that check is bounded:
//! see [`limits`].

pub mod limits;
pub mod tls;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use sigil_identity::attestation::{AttestError, Challenger, ServerNodeAttestor};
use sigil_identity::clock::Clock;
use sigil_identity::{AgentId, EntryId, RegistrationEntry, SpiffeId};
use sigil_proto::convert::unix_i64;
use sigil_proto::node::{self as pb, node_server::Node};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use self::tls::{NodeConnInfo, PeerSvid};
use crate::agents::{AgentService, Presented};
use crate::audit::Audit;
use crate::ca::x509::IssuedSvid;
use crate::ca::{CaError, CaManager};
use crate::datastore::AgentRecord;
use crate::registry::{AgentEvent, Registry, SyncStart};
use crate::status::{agent_status, attest_status, ca_status, revoked};
use crate::telemetry::{Outcome, ServerMetrics, SvidType};
use sigil_identity::rate_limit::RateLimiter;

/// How long the server waits for an answer to an attestation challenge.
const CHALLENGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most CSRs in one BatchNewX509Svid call.
pub const MAX_BATCH: usize = 1000;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The node API service.
pub struct NodeService {
    pub(crate) ca: Arc<CaManager>,
    pub(crate) registry: Arc<Registry>,
    /// Attestation, authentication and renewal of agents.
    pub(crate) agents: Arc<AgentService>,
    pub(crate) attestors: HashMap<&'static str, Arc<dyn ServerNodeAttestor>>,
    pub(crate) audit: Audit,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) agent_svid_ttl: Duration,
    pub(crate) attest_limit: RateLimiter<std::net::IpAddr>,
    pub(crate) sign_limit: RateLimiter<AgentId>,
    /// Becomes true when the server shuts down; open streams then end.
    pub(crate) shutdown: tokio::sync::watch::Receiver<bool>,
    /// The current bundle and its wire form, encoded once per bundle (the
    /// JWKS serialisation costs more than the rest of a FetchBundle call).
    pub(crate) wire_bundle: std::sync::Mutex<Option<(Arc<sigil_identity::Bundle>, pb::Bundle)>>,
    pub(crate) metrics: Arc<ServerMetrics>,
    /// The trust domain's CRLs, sent with the bundle.
    pub(crate) revocations: Arc<crate::revocation::Revocations>,
    /// Federated trust domains' bundles, sent to every agent.
    pub(crate) federated: Arc<crate::federation::FederatedSet>,
}

impl std::fmt::Debug for NodeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeService").finish_non_exhaustive()
    }
}

fn svid_message(id: &SpiffeId, issued: &IssuedSvid) -> pb::X509Svid {
    pb::X509Svid {
        spiffe_id: id.to_string(),
        cert_chain: issued.chain.clone(),
        expires_at: unix_i64(issued.expires_at),
        serial: issued.serial.clone(),
    }
}

/// The pin of an issued SVID: SHA-256 of its leaf.
fn issued_sha256(issued: &IssuedSvid) -> Result<String, Status> {
    issued
        .chain
        .first()
        .map(|leaf| crate::datastore::cert_sha256(leaf))
        .ok_or_else(|| Status::internal("the CA returned an empty certificate chain"))
}

/// Relays attestation challenges over the Attest stream.
struct StreamChallenger<'a> {
    tx: mpsc::Sender<Result<pb::AttestResponse, Status>>,
    inbound: &'a mut Streaming<pb::AttestRequest>,
}

#[async_trait]
impl Challenger for StreamChallenger<'_> {
    async fn challenge(&mut self, challenge: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        let msg = pb::AttestResponse {
            step: Some(pb::attest_response::Step::Challenge(challenge)),
        };
        self.tx
            .send(Ok(msg))
            .await
            .map_err(|_| AttestError::Challenge)?;
        match tokio::time::timeout(CHALLENGE_TIMEOUT, self.inbound.message()).await {
            Ok(Ok(Some(pb::AttestRequest {
                step: Some(pb::attest_request::Step::ChallengeResponse(r)),
            }))) => Ok(r),
            _ => Err(AttestError::Challenge),
        }
    }
}

/// A caller that passed [`NodeService::check_peer`].
pub(crate) struct Pinned {
    ctx: AgentCtx,
    /// The agent's record, when the caller presented the renewed SVID (not
    /// yet the pin).
    record: Option<AgentRecord>,
}

/// An authenticated agent.
struct AgentCtx {
    id: AgentId,
    /// When the SVID it presented expires.
    not_after: SystemTime,
}

impl NodeService {
    /// The current bundle as sent to agents.
    fn bundle_message(&self) -> pb::Bundle {
        let current = self.ca.bundle();
        let mut cached = self.wire_bundle.lock().unwrap_or_else(|p| p.into_inner());
        let mut wire = match &*cached {
            Some((bundle, wire)) if Arc::ptr_eq(bundle, &current) => wire.clone(),
            _ => {
                let wire = pb::Bundle::from(&*current);
                *cached = Some((current, wire.clone()));
                wire
            }
        };
        drop(cached);
        // One CRL per CA of the trust domain (see `crate::revocation`).
        wire.crls = self.revocations.crls().to_vec();
        wire
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Checks the caller's presented SVID against the agent's pin without
    /// touching the datastore (see [`AgentService::check_presented`]); when
    /// it is the renewal in flight, [`Pinned::record`] holds the agent's
    /// record. Run before a request's body is read, so callers that are
    /// not agents cannot make the server buffer anything.
    pub(crate) fn check_peer(&self, peer: &PeerSvid) -> Result<Pinned, Status> {
        let svid = match peer {
            PeerSvid::Absent => {
                return Err(Status::unauthenticated(
                    "this call needs a client certificate: the agent SVID from attestation",
                ));
            }
            PeerSvid::Invalid => return Err(Status::unauthenticated("bad client certificate")),
            PeerSvid::Svid {
                id,
                serial,
                cert_sha256,
                not_after,
            } => Presented {
                id,
                serial,
                cert_sha256,
                not_after: *not_after,
            },
        };
        let (id, record) = self
            .agents
            .check_presented(svid)
            .map_err(|e| agent_status(&e))?;
        Ok(Pinned {
            ctx: AgentCtx {
                id,
                not_after: svid.not_after,
            },
            record,
        })
    }

    /// Authenticates the calling agent by its presented SVID (see
    /// [`NodeService::check_peer`]); the first use of a renewed SVID makes
    /// it the pin.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<AgentCtx, Status> {
        let info = req
            .extensions()
            .get::<NodeConnInfo>()
            .ok_or_else(|| Status::internal("no connection info"))?;
        let Pinned { ctx, record } = self.check_peer(&info.peer)?;
        let (
            Some(record),
            PeerSvid::Svid {
                id,
                serial,
                cert_sha256,
                ..
            },
        ) = (record, &*info.peer)
        else {
            return Ok(ctx);
        };
        let svid = Presented {
            id,
            serial,
            cert_sha256,
            not_after: ctx.not_after,
        };
        self.agents
            .pin(record, svid)
            .await
            .map_err(|e| agent_status(&e))?;
        Ok(ctx)
    }

    async fn attest_flow(
        &self,
        remote: std::net::SocketAddr,
        inbound: &mut Streaming<pb::AttestRequest>,
        tx: mpsc::Sender<Result<pb::AttestResponse, Status>>,
    ) -> Result<pb::AttestResult, Status> {
        let first = tokio::time::timeout(limits::ATTEST_FIRST_MESSAGE, inbound.message())
            .await
            .map_err(|_| {
                debug!(%remote, "attestation parameters did not arrive in time");
                Status::deadline_exceeded(format!(
                    "no attestation parameters within {:?}",
                    limits::ATTEST_FIRST_MESSAGE
                ))
            })??
            .ok_or_else(|| Status::invalid_argument("attestation stream ended early"))?;
        let Some(pb::attest_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument(
                "the first attestation message must carry params",
            ));
        };
        let attestor = self
            .attestors
            .get(params.attestor.as_str())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "node attestor {:?} is not enabled",
                    params.attestor
                ))
            })?
            .clone();
        // Check the CSR before the attestor can consume a single-use token.
        crate::ca::csr::public_key_from_csr(&params.csr)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let mut challenger = StreamChallenger { tx, inbound };
        let attestation = match attestor.attest(&params.evidence, &mut challenger).await {
            Ok(a) => a,
            Err(e) => {
                warn!(attestor = attestor.name(), %remote, error = %e, "node attestation failed");
                // Refused attempts (a used or unknown join token, a bad
                // chain) are audited too, with the attestor's reason.
                self.audit
                    .record(
                        &remote.to_string(),
                        "agent.attest",
                        attestor.name(),
                        &e.to_string(),
                    )
                    .await;
                return Err(attest_status(&e));
            }
        };
        let id = attestation.agent_id.clone();
        let existing = self.agents.admissible(&id).map_err(|e| agent_status(&e))?;
        let issued = self
            .metrics
            .counted(
                SvidType::Agent,
                self.ca
                    .issue_x509_svid(&id, &[], Some(self.agent_svid_ttl), &params.csr),
            )
            .map_err(|e| ca_status(&e))?;
        let record = AgentRecord {
            id: id.clone(),
            attestor: attestor.name().to_owned(),
            serial: issued.serial.clone(),
            cert_sha256: issued_sha256(&issued)?,
            pending_cert_sha256: None,
            expires_at: issued.expires_at,
            selectors: attestation.selectors,
            banned: false,
            can_reattest: attestation.can_reattest,
            created_at: existing.as_ref().map_or(self.now(), |e| e.created_at),
        };
        // Written with the agent record, in one write.
        let event = self.audit.issued(
            &id.to_string(),
            "agent.attest",
            &id.to_string(),
            issued.expires_at,
        );
        self.agents
            .admit(record, existing.as_ref(), event)
            .await
            .map_err(|e| agent_status(&e))?;
        info!(agent_id = %id, attestor = attestor.name(), %remote, serial = %issued.serial, "agent attested");
        Ok(pb::AttestResult {
            svid: Some(svid_message(&id, &issued)),
            bundle: Some(self.bundle_message()),
        })
    }

    fn snapshot(&self, start: &SyncStart) -> pb::SyncResponse {
        pb::SyncResponse {
            event: Some(pb::sync_response::Event::Snapshot(pb::Snapshot {
                full: start.full,
                entries: start
                    .entries
                    .iter()
                    .map(|e| pb::Entry::from(&**e))
                    .collect(),
                removed: start.removed.iter().map(ToString::to_string).collect(),
                bundle: Some(self.bundle_message()),
                federated_bundles: self
                    .federated
                    .current()
                    .values()
                    .map(|b| pb::Bundle::from(&**b))
                    .collect(),
            })),
            revision: start.revision,
        }
    }

    /// Issues SVIDs for `work` on all cores; results keep the input order.
    fn issue_parallel(
        &self,
        work: Vec<(Arc<RegistrationEntry>, Vec<u8>)>,
    ) -> Vec<Result<IssuedSvid, CaError>> {
        let issue_all =
            |part: &[(Arc<RegistrationEntry>, Vec<u8>)]| -> Vec<Result<IssuedSvid, CaError>> {
                part.iter()
                    .map(|(e, csr)| {
                        self.ca
                            .issue_x509_svid(&e.spiffe_id, &e.dns_names, e.x509_svid_ttl, csr)
                    })
                    .collect()
            };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(work.len().max(1));
        if threads <= 1 || work.len() < 4 {
            return issue_all(&work);
        }
        let chunk = work.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = work
                .chunks(chunk)
                .map(|part| (part.len(), s.spawn(move || issue_all(part))))
                .collect();
            // One result per item, in order, even if a thread panicked: a
            // shifted result would hand one entry's SVID to another.
            handles
                .into_iter()
                .flat_map(|(len, h)| {
                    h.join().unwrap_or_else(|_| {
                        (0..len)
                            .map(|_| Err(CaError::Build("issuing thread panicked".into())))
                            .collect()
                    })
                })
                .collect()
        })
    }
}

/// The tonic-facing handle of [`NodeService`].
#[derive(Debug, Clone)]
pub struct NodeApi(pub Arc<NodeService>);

impl std::ops::Deref for NodeApi {
    type Target = NodeService;
    fn deref(&self) -> &NodeService {
        &self.0
    }
}

#[tonic::async_trait]
impl Node for NodeApi {
    type AttestStream = BoxStream<pb::AttestResponse>;
    type SyncStream = BoxStream<pb::SyncResponse>;

    async fn attest(
        &self,
        req: Request<Streaming<pb::AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let remote = req
            .extensions()
            .get::<NodeConnInfo>()
            .map(|i| i.remote)
            .ok_or_else(|| Status::internal("no connection info"))?;
        if !self
            .attest_limit
            .try_take(&remote.ip(), 1.0, Instant::now())
        {
            warn!(%remote, "attestation rate limit hit");
            return Err(Status::resource_exhausted(
                "too many attestation attempts from this address; retry later",
            ));
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.0.clone();
        tokio::spawn(sigil_proto::telemetry::in_current_request(async move {
            let result = this.attest_flow(remote, &mut inbound, tx.clone()).await;
            let msg = result.map(|r| pb::AttestResponse {
                step: Some(pb::attest_response::Step::Result(r)),
            });
            let _ = tx.send(msg).await;
        }));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let ctx = self.authenticate(&req).await?;
        if !self.sign_limit.try_take(&ctx.id, 1.0, Instant::now()) {
            return Err(Status::resource_exhausted(
                "signing rate limit reached for this agent",
            ));
        }
        let issued = self
            .metrics
            .counted(
                SvidType::Agent,
                self.ca.issue_x509_svid(
                    &ctx.id,
                    &[],
                    Some(self.agent_svid_ttl),
                    &req.get_ref().csr,
                ),
            )
            .map_err(|e| ca_status(&e))?;
        // Written with the agent record, in one write.
        let event = self.audit.issued(
            ctx.id.as_str(),
            "agent.renew",
            ctx.id.as_str(),
            issued.expires_at,
        );
        self.agents
            .renew(&ctx.id, issued_sha256(&issued)?, event)
            .await
            .map_err(|e| agent_status(&e))?;
        info!(agent_id = %ctx.id, serial = %issued.serial, "agent SVID renewed");
        Ok(Response::new(pb::RenewAgentResponse {
            svid: Some(svid_message(&ctx.id, &issued)),
        }))
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let ctx = self.authenticate(&req).await?;
        let since = req.get_ref().since_revision;
        let (start, mut events, subscription) = self.registry.subscribe(&ctx.id, since, self.now());
        let (tx, rx) = mpsc::channel(64);
        let this = self.0.clone();
        let mut bundles = self.ca.subscribe_bundle();
        bundles.borrow_and_update();
        let mut crls = self.revocations.subscribe();
        crls.borrow_and_update();
        let mut federated = self.federated.subscribe();
        let mut sent_federated = federated.borrow_and_update().clone();
        let stopped = crate::shutdown::wait_for_stop(self.shutdown.clone());
        // The stream lives no longer than the SVID that opened it.
        let svid_left = ctx
            .not_after
            .duration_since(self.now())
            .unwrap_or(Duration::ZERO);
        let expired = tokio::time::sleep(svid_left);
        info!(agent_id = %ctx.id, since, full = start.full, entries = start.entries.len(), "sync stream opened");
        tokio::spawn(async move {
            let _subscription = subscription;
            let _counted = this.metrics.sync_stream();
            tokio::pin!(stopped);
            tokio::pin!(expired);
            let mut revision = start.revision;
            if tx.send(Ok(this.snapshot(&start))).await.is_err() {
                return;
            }
            loop {
                let msg = tokio::select! {
                    () = tx.closed() => return,
                    () = &mut expired => {
                        let _ = tx.send(Err(Status::permission_denied("agent SVID expired; renew and reconnect"))).await;
                        return;
                    }
                    () = &mut stopped => {
                        let _ = tx.send(Err(Status::unavailable("server shutting down; reconnect"))).await;
                        return;
                    }
                    ev = events.recv() => match ev {
                        Some(AgentEvent::Upsert(e)) => {
                            revision = revision.max(e.revision);
                            pb::SyncResponse { event: Some(pb::sync_response::Event::EntryUpsert((&*e).into())), revision }
                        }
                        Some(AgentEvent::Removed(id, rev)) => {
                            revision = revision.max(rev);
                            pb::SyncResponse { event: Some(pb::sync_response::Event::EntryRemoved(id.to_string())), revision }
                        }
                        Some(AgentEvent::Resync) => {
                            let start = this.registry.full_set(&ctx.id, this.now());
                            revision = start.revision;
                            sent_federated = this.federated.current();
                            this.snapshot(&start)
                        }
                        Some(AgentEvent::Revoked(why)) => {
                            let msg = pb::SyncResponse { event: Some(pb::sync_response::Event::Revoked(why.to_owned())), revision };
                            let _ = tx.send(Ok(msg)).await;
                            let _ = tx.send(Err(revoked(Status::permission_denied(why)))).await;
                            return;
                        }
                        Some(AgentEvent::Displaced) => {
                            let _ = tx.send(Err(Status::resource_exhausted(format!(
                                "this agent opened more than {} Sync streams; its oldest was closed",
                                crate::registry::MAX_SYNC_STREAMS_PER_AGENT
                            )))).await;
                            return;
                        }
                        Some(AgentEvent::Superseded) => {
                            let _ = tx.send(Err(Status::permission_denied("agent SVID superseded; reconnect with the new one"))).await;
                            return;
                        }
                        None => {
                            let _ = tx.send(Err(Status::unavailable("sync stream fell behind; reconnect to resume"))).await;
                            return;
                        }
                    },
                    r = crls.changed() => {
                        if r.is_err() { return; }
                        // New CRLs travel in the bundle message.
                        crls.borrow_and_update();
                        pb::SyncResponse { event: Some(pb::sync_response::Event::Bundle(this.bundle_message())), revision }
                    }
                    r = bundles.changed() => {
                        if r.is_err() { return; }
                        // The CA's current bundle (this one or newer),
                        // encoded once for every agent's stream.
                        bundles.borrow_and_update();
                        pb::SyncResponse { event: Some(pb::sync_response::Event::Bundle(this.bundle_message())), revision }
                    }
                    r = federated.changed() => {
                        if r.is_err() { return; }
                        let now = federated.borrow_and_update().clone();
                        for event in crate::federation::sync_events(&sent_federated, &now) {
                            if tx.send(Ok(pb::SyncResponse { event: Some(event), revision })).await.is_err() {
                                return;
                            }
                        }
                        sent_federated = now;
                        continue;
                    }
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn batch_new_x509_svid(
        &self,
        req: Request<pb::BatchNewX509SvidRequest>,
    ) -> Result<Response<pb::BatchNewX509SvidResponse>, Status> {
        let ctx = self.authenticate(&req).await?;
        let params = req.into_inner().params;
        if params.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} CSRs per call"
            )));
        }
        if !self
            .sign_limit
            .try_take(&ctx.id, params.len() as f64, Instant::now())
        {
            return Err(Status::resource_exhausted(
                "signing rate limit reached for this agent; retry later",
            ));
        }
        let now = self.now();
        let mut results: Vec<pb::SvidResult> = Vec::with_capacity(params.len());
        let mut work = Vec::new();
        let mut slots = Vec::new();
        for p in params {
            let entry = EntryId::new(&p.entry_id)
                .ok()
                .and_then(|id| self.registry.authorized_entry(&ctx.id, &id, now));
            match entry {
                Some(e) => {
                    slots.push(results.len());
                    work.push((e, p.csr));
                    results.push(pb::SvidResult {
                        entry_id: p.entry_id,
                        ..Default::default()
                    });
                }
                None => {
                    self.metrics.issued(SvidType::X509, Outcome::Denied);
                    warn!(agent_id = %ctx.id, entry_id = %p.entry_id, "SVID requested for an entry the agent is not authorized for");
                    results.push(pb::SvidResult {
                        entry_id: p.entry_id,
                        svid: None,
                        code: tonic::Code::PermissionDenied as i32,
                        message: "entry not found or not authorized for this agent".into(),
                    });
                }
            }
        }
        let entries: Vec<Arc<RegistrationEntry>> = work.iter().map(|(e, _)| e.clone()).collect();
        let this = self.0.clone();
        let issued = tokio::task::spawn_blocking(move || this.issue_parallel(work))
            .await
            .map_err(|_| Status::internal("issuance task failed"))?;
        if issued.len() != slots.len() {
            return Err(Status::internal(
                "issuance returned the wrong number of results",
            ));
        }
        let mut audit = Vec::new();
        for ((slot, entry), outcome) in slots.into_iter().zip(entries).zip(issued) {
            match outcome {
                Ok(svid) => {
                    self.metrics.issued(SvidType::X509, Outcome::Ok);
                    audit.push(self.audit.issued(
                        ctx.id.as_str(),
                        "svid.x509.issue",
                        entry.spiffe_id.as_str(),
                        svid.expires_at,
                    ));
                    results[slot].svid = Some(svid_message(&entry.spiffe_id, &svid));
                }
                Err(e) => {
                    self.metrics.issued(SvidType::X509, Outcome::Error);
                    let status = ca_status(&e);
                    results[slot].code = status.code() as i32;
                    results[slot].message = status.message().to_owned();
                }
            }
        }
        self.audit.record_issued(audit).await;
        Ok(Response::new(pb::BatchNewX509SvidResponse { results }))
    }

    async fn new_jwt_svid(
        &self,
        req: Request<pb::NewJwtSvidRequest>,
    ) -> Result<Response<pb::NewJwtSvidResponse>, Status> {
        let ctx = self.authenticate(&req).await?;
        if !self.sign_limit.try_take(&ctx.id, 1.0, Instant::now()) {
            return Err(Status::resource_exhausted(
                "signing rate limit reached for this agent; retry later",
            ));
        }
        let req = req.into_inner();
        let entry = EntryId::new(&req.entry_id)
            .ok()
            .and_then(|id| self.registry.authorized_entry(&ctx.id, &id, self.now()))
            .ok_or_else(|| {
                self.metrics.issued(SvidType::Jwt, Outcome::Denied);
                Status::permission_denied("entry not found or not authorized for this agent")
            })?;
        let svid = self
            .metrics
            .counted(
                SvidType::Jwt,
                self.ca
                    .mint_jwt_svid(&entry.spiffe_id, &req.audience, entry.jwt_svid_ttl),
            )
            .map_err(|e| ca_status(&e))?;
        self.audit
            .record_issued(vec![self.audit.issued(
                ctx.id.as_str(),
                "svid.jwt.issue",
                entry.spiffe_id.as_str(),
                svid.expiry,
            )])
            .await;
        Ok(Response::new(pb::NewJwtSvidResponse {
            spiffe_id: entry.spiffe_id.to_string(),
            token: svid.token,
            expires_at: unix_i64(svid.expiry),
        }))
    }

    async fn fetch_bundle(
        &self,
        req: Request<pb::FetchBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        self.authenticate(&req).await?;
        Ok(Response::new(self.bundle_message()))
    }
}

#[cfg(test)]
mod tests;
