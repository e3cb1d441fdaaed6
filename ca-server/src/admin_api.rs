//! The admin API (`sigil.admin.v1`) on a local Unix socket, and over mTLS
//! on TCP when configured ([`mtls`]).
//!
//! Default deny: the socket is created with mode 0770, and each call is
//! checked again against the caller's kernel credentials (SO_PEERCRED):
//! only root, the server's own uid and configured admin uids may call.
//! Over mTLS, [`mtls::Guarded`] authorizes each call by the caller's SVID.

mod authority;
pub mod mtls;
mod revoke;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sigil_identity::clock::Clock;
use sigil_identity::entry::is_valid_name;
use sigil_identity::{
    AdminRole, AgentId, DnsName, EntryId, RegistrationEntry, Selector, SpiffeId, TrustDomain,
};
use sigil_proto::admin::{self as pb, admin_server::Admin};
use sigil_proto::convert::{spiffe_id, unix_i64};
use sigil_proto::node as node_pb;
use tokio::net::UnixListener;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::agents::{AgentError, AgentService};
use crate::audit::Audit;
use crate::ca::CaManager;
use crate::datastore::{
    AgentRecord, Datastore, DatastoreError, EntryBatch, EntryFilter, JoinTokenRecord, TokenHash,
};
use crate::entry_apply;
use crate::registry::Registry;
use crate::status::{agent_status, batch_status, ca_status, store_status};

/// Most entries in one batch call.
pub const MAX_BATCH: usize = 10_000;

pub use sigil_proto::socket::SocketError;

/// Binds the admin socket at `path` with mode 0770 (parent directory 0750
/// if it has to be created).
pub fn bind_socket(path: &Path) -> Result<UnixListener, SocketError> {
    sigil_proto::socket::bind_unix(path, 0o750, 0o770)
}

/// The effective uid of this process, read from `/proc/self`.
pub fn own_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// The admin API service.
pub struct AdminService {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) ca: Arc<CaManager>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: Arc<dyn Datastore>,
    /// Bans and evictions.
    pub(crate) agents: Arc<AgentService>,
    pub(crate) audit: Audit,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) allowed_uids: BTreeSet<u32>,
    pub(crate) token_ttl: Duration,
    /// `x509 revoke`, and the revocation of a banned agent's SVIDs.
    pub(crate) revocations: Arc<crate::revocation::Revocations>,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService")
            .field("allowed_uids", &self.allowed_uids)
            .finish_non_exhaustive()
    }
}

fn agent_message(a: &AgentRecord) -> pb::Agent {
    pb::Agent {
        id: a.id.to_string(),
        attestor: a.attestor.clone(),
        serial: a.serial.clone(),
        expires_at: unix_i64(a.expires_at),
        selectors: a.selectors.iter().map(ToString::to_string).collect(),
        banned: a.banned,
        can_reattest: a.can_reattest,
        created_at: unix_i64(a.created_at),
    }
}

/// An admin request's agent id: a SPIFFE ID under `/sigil/agent/`.
fn agent_id(raw: &str) -> Result<AgentId, Status> {
    AgentId::try_from(spiffe_id("id", raw)?)
        .map_err(|e| Status::invalid_argument(format!("id: {e}")))
}

fn ok_status() -> Option<pb::ItemStatus> {
    Some(pb::ItemStatus {
        code: 0,
        message: String::new(),
    })
}

fn item_status(s: &Status) -> Option<pb::ItemStatus> {
    Some(pb::ItemStatus {
        code: s.code() as i32,
        message: s.message().to_owned(),
    })
}

fn ttl(v: i64) -> Result<Option<Duration>, Status> {
    match v {
        0 => Ok(None),
        v if v > 0 => Ok(Some(Duration::from_secs(v as u64))),
        _ => Err(Status::invalid_argument("ttl must not be negative")),
    }
}

impl AdminService {
    /// Who is calling, or PermissionDenied for anyone not allowed.
    fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        // Over mTLS the guard has authorized this call for this SPIFFE ID.
        if let Some(remote) = req.extensions().get::<mtls::RemoteCaller>() {
            return Ok(remote.0.to_string());
        }
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .ok_or_else(|| Status::permission_denied("caller credentials unavailable"))?;
        let uid = cred.uid();
        if !self.allowed_uids.contains(&uid) {
            warn!(uid, pid = cred.pid(), "admin API call refused");
            return Err(Status::permission_denied(
                "this uid may not use the admin API",
            ));
        }
        Ok(format!("uid:{uid}"))
    }

    pub(crate) fn check_entry(&self, e: &RegistrationEntry) -> Result<(), Status> {
        e.check(&self.trust_domain)
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        if !(e.parent_id.is_agent() || e.is_node_alias() || e.parent_id.check_workload_id().is_ok())
        {
            return Err(Status::invalid_argument(
                "parent id must be an agent, the server (node alias) or another entry's id",
            ));
        }
        Ok(())
    }

    /// A SPIFFE ID the admin API may mint for: a workload ID of our trust
    /// domain (never the server's or an agent's).
    fn mintable(&self, raw: &str) -> Result<SpiffeId, Status> {
        let id = spiffe_id("spiffe_id", raw)?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(Status::invalid_argument(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        id.check_workload_id()
            .map_err(|e| Status::invalid_argument(format!("{id}: {e}")))?;
        Ok(id)
    }

    pub(crate) async fn after_entry_change(&self) {
        if let Err(e) = self.registry.catch_up().await {
            warn!(error = %e, "registry could not catch up with the datastore");
        }
    }

    /// Bans or evicts the agent `raw_id` for `caller` (audited either way).
    async fn agent_op(
        &self,
        caller: &str,
        action: &str,
        raw_id: &str,
        ban: bool,
    ) -> Result<AgentRecord, Status> {
        let id = match agent_id(raw_id) {
            Ok(id) => id,
            Err(status) => {
                self.audit
                    .record(caller, action, raw_id, status.message())
                    .await;
                return Err(status);
            }
        };
        let result = if ban {
            self.agents.ban(caller, &id).await
        } else {
            self.agents.evict(caller, &id).await
        };
        result.map_err(|e| agent_status(&e))
    }

    /// Creates a join token (and its alias entry) for `create_join_token`.
    async fn join_token(
        &self,
        caller: &str,
        r: pb::CreateJoinTokenRequest,
    ) -> Result<pb::CreateJoinTokenResponse, Status> {
        let ttl = ttl(r.ttl)?.unwrap_or(self.token_ttl);
        let alias = (!r.alias.is_empty())
            .then(|| spiffe_id("alias", &r.alias))
            .transpose()?;
        if let Some(alias) = alias
            .as_ref()
            .filter(|a| !a.is_member_of(&self.trust_domain) || a.check_workload_id().is_err())
        {
            return Err(Status::invalid_argument(format!(
                "alias {alias} must be in {} and outside the reserved /sigil/ path",
                self.trust_domain
            )));
        }
        let token = sigil_attestors::join_token::generate_token();
        let expires_at = self
            .clock
            .now()
            .checked_add(ttl)
            .filter(|_| ttl <= Duration::from_secs(366 * 86400))
            .ok_or_else(|| Status::invalid_argument("token ttl must be at most 366 days"))?;
        let record = JoinTokenRecord {
            hash: TokenHash::of(&token),
            expires_at,
            alias: alias.clone(),
        };
        let target = format!(
            "join_token:{}",
            sigil_attestors::join_token::token_id(&token)
        );
        let generated = self.audit.event(caller, "token.generate", &target, "ok");
        self.store
            .create_join_token_audited(record, Some(generated.clone()))
            .await
            .map_err(|e| store_status(&e))?;
        self.audit.log_written(&[generated]);
        if let Some(alias) = &alias {
            // The alias is a node entry selecting exactly the agent that
            // will attest with this token.
            let selectors = [sigil_attestors::join_token::selector_for(&token)]
                .into_iter()
                .collect();
            let entry = RegistrationEntry::new(
                alias.clone(),
                SpiffeId::server(&self.trust_domain),
                selectors,
            );
            let created = self
                .audit
                .event(caller, "entry.create", entry.id.as_str(), "ok");
            let stored = self
                .store
                .create_entries_audited(vec![(entry, Some(created.clone()))])
                .await;
            // Even a failed call may have written (see
            // `DatastoreError::Durability`): catch up with the store first.
            self.after_entry_change().await;
            for outcome in stored.map_err(|e| store_status(&e))? {
                outcome.map_err(|e| store_status(&e))?;
            }
            self.audit.log_written(&[created]);
        }
        Ok(pb::CreateJoinTokenResponse {
            token,
            expires_at: unix_i64(expires_at),
        })
    }

    /// Serves `ApplyEntries` for `caller` (planning in [`entry_apply`]).
    async fn apply_registration(
        &self,
        caller: &str,
        req: pb::ApplyEntriesRequest,
    ) -> Result<pb::ApplyEntriesResponse, Status> {
        let owner = req.owner;
        if !is_valid_name(&owner) {
            return Err(Status::invalid_argument(
                "owner must be 1 to 128 characters of a-z, A-Z, 0-9, '-', '_', '.' or '/'",
            ));
        }
        if req.entries.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} entries per registration file"
            )));
        }
        let wanted = entry_apply::wanted(|e| self.check_entry(e), &owner, req.entries)?;
        let stored = self
            .store
            .list_entries(&EntryFilter::default())
            .await
            .map_err(|e| store_status(&e))?;
        let mut planned = entry_apply::plan(&owner, wanted, stored, req.prune)?;
        if req.dry_run {
            return Ok(pb::ApplyEntriesResponse {
                changes: planned.iter().map(|p| p.message(false)).collect(),
                applied: false,
            });
        }
        let mut batch = EntryBatch::default();
        for p in &planned {
            let action = match p.kind {
                "create" => {
                    batch.create.push(p.entry.clone());
                    "entry.create"
                }
                "update" | "adopt" => {
                    batch.update.push(p.entry.clone());
                    "entry.update"
                }
                "delete" => {
                    batch.delete.push((p.entry.id.clone(), p.entry.revision));
                    "entry.delete"
                }
                _ => continue,
            };
            let target = format!("{} owner={} name={}", p.entry.id, owner, p.entry.name);
            batch
                .audit
                .push(self.audit.event(caller, action, &target, "ok"));
        }
        // Written with the changes, in one write.
        let audit = batch.audit.clone();
        let made = match self.store.apply_entries(batch).await {
            Ok(made) => made,
            Err(err) => {
                // A failed sync leaves the changes applied (see
                // `DatastoreError::Durability`): agents follow the store.
                if matches!(err, DatastoreError::Durability(_)) {
                    self.after_entry_change().await;
                }
                let target = format!("owner={owner}");
                self.audit
                    .record(caller, "entry.apply", &target, &err.to_string())
                    .await;
                return Err(batch_status(&err));
            }
        };
        // Creations got their ids when the wanted entries were built; keep
        // the stored revisions for the report.
        let ids: HashMap<&EntryId, u64> = made
            .iter()
            .filter_map(|c| c.as_entry())
            .map(|(_, e)| (&e.id, e.revision))
            .collect();
        for p in &mut planned {
            if let Some(rev) = ids.get(&p.entry.id) {
                p.entry.revision = *rev;
            }
        }
        self.audit.log_written(&audit);
        if !made.is_empty() {
            self.after_entry_change().await;
        }
        Ok(pb::ApplyEntriesResponse {
            changes: planned.iter().map(|p| p.message(true)).collect(),
            applied: true,
        })
    }
}

/// The tonic-facing handle of [`AdminService`].
#[derive(Debug, Clone)]
pub struct AdminApi(pub Arc<AdminService>);

impl std::ops::Deref for AdminApi {
    type Target = AdminService;
    fn deref(&self) -> &AdminService {
        &self.0
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_entries(
        &self,
        req: Request<pb::CreateEntriesRequest>,
    ) -> Result<Response<pb::CreateEntriesResponse>, Status> {
        let caller = self.caller(&req)?;
        let wire = req.into_inner().entries;
        if wire.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} entries per call"
            )));
        }
        let mut results = vec![pb::CreateEntryResult::default(); wire.len()];
        let mut valid = Vec::new();
        let mut slots = Vec::new();
        let mut audit = Vec::new();
        for (i, w) in wire.into_iter().enumerate() {
            let target = w.spiffe_id.clone();
            let parsed = RegistrationEntry::try_from(w)
                .map_err(Status::from)
                .and_then(|e| self.check_entry(&e).map(|()| e));
            match parsed {
                Ok(e) => {
                    slots.push(i);
                    let ok = self
                        .audit
                        .event(&caller, "entry.create", e.id.as_str(), "ok");
                    valid.push((e, Some(ok)));
                }
                Err(s) => {
                    // Refused entries are audited, named by their SPIFFE ID.
                    audit.push(
                        self.audit
                            .event(&caller, "entry.create", &target, s.message()),
                    );
                    results[i].status = item_status(&s);
                }
            }
        }
        let ok_events: Vec<_> = valid.iter().filter_map(|(_, ok)| ok.clone()).collect();
        let stored = self
            .store
            .create_entries_audited(valid)
            .await
            .map_err(|e| store_status(&e))?;
        for ((slot, outcome), ok) in slots.into_iter().zip(stored).zip(ok_events) {
            match outcome {
                Ok(e) => {
                    // Written with the entry.
                    self.audit.log_written(&[ok]);
                    results[slot] = pb::CreateEntryResult {
                        status: ok_status(),
                        entry: Some((&e).into()),
                    };
                }
                Err(err) => {
                    audit.push(
                        self.audit
                            .event(&caller, "entry.create", "", &err.to_string()),
                    );
                    results[slot].status = item_status(&store_status(&err));
                }
            }
        }
        self.audit.record_all(audit).await;
        self.after_entry_change().await;
        Ok(Response::new(pb::CreateEntriesResponse { results }))
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        self.caller(&req)?;
        let r = req.into_inner();
        if !r.id.is_empty() {
            let id = EntryId::new(&r.id)
                .map_err(|e| Status::invalid_argument(format!("invalid id: {e}")))?;
            let e = self
                .store
                .fetch_entry(&id)
                .await
                .map_err(|e| store_status(&e))?;
            let e = e.ok_or_else(|| Status::not_found(format!("entry {id} not found")))?;
            return Ok(Response::new(pb::ListEntriesResponse {
                entries: vec![(&e).into()],
            }));
        }
        let selectors = if r.selectors.is_empty() {
            None
        } else {
            Some(
                r.selectors
                    .iter()
                    .map(|s| {
                        Selector::parse(s)
                            .map_err(|e| Status::invalid_argument(format!("invalid selector: {e}")))
                    })
                    .collect::<Result<_, _>>()?,
            )
        };
        let filter = EntryFilter {
            spiffe_id: (!r.spiffe_id.is_empty())
                .then(|| spiffe_id("spiffe_id", &r.spiffe_id))
                .transpose()?,
            parent_id: (!r.parent_id.is_empty())
                .then(|| spiffe_id("parent_id", &r.parent_id))
                .transpose()?,
            selectors,
            owner: (!r.owner.is_empty()).then_some(r.owner),
        };
        let entries = self
            .store
            .list_entries(&filter)
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(Into::into).collect(),
        }))
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<node_pb::Entry>, Status> {
        let caller = self.caller(&req)?;
        let wire = req.into_inner().entry;
        let raw_id = wire.as_ref().map(|w| w.id.clone()).unwrap_or_default();
        let checked = wire
            .ok_or_else(|| Status::invalid_argument("entry is required"))
            .and_then(|wire| {
                if wire.id.is_empty() {
                    return Err(Status::invalid_argument(
                        "entry id is required for an update",
                    ));
                }
                let e = RegistrationEntry::try_from(wire)?;
                self.check_entry(&e)?;
                Ok(e)
            });
        let e = match checked {
            Ok(e) => e,
            Err(status) => {
                self.audit
                    .record(&caller, "entry.update", &raw_id, status.message())
                    .await;
                return Err(status);
            }
        };
        let id = e.id.clone();
        let ok = self.audit.event(&caller, "entry.update", id.as_str(), "ok");
        let result = self
            .store
            .update_entry_audited(e, Some(ok.clone()))
            .await
            .map_err(|e| store_status(&e));
        match &result {
            Ok(_) => self.audit.log_written(&[ok]),
            Err(s) => {
                self.audit
                    .record(&caller, "entry.update", id.as_str(), s.message())
                    .await;
            }
        }
        self.after_entry_change().await;
        Ok(Response::new((&result?).into()))
    }

    async fn delete_entries(
        &self,
        req: Request<pb::DeleteEntriesRequest>,
    ) -> Result<Response<pb::DeleteEntriesResponse>, Status> {
        let caller = self.caller(&req)?;
        let ids = req.into_inner().ids;
        if ids.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} ids per call"
            )));
        }
        let mut results = Vec::with_capacity(ids.len());
        let mut audit = Vec::new();
        for raw in ids {
            let ok = self.audit.event(&caller, "entry.delete", &raw, "ok");
            let outcome = match EntryId::new(&raw) {
                Err(e) => Err(Status::invalid_argument(format!("invalid id {raw:?}: {e}"))),
                Ok(id) => self
                    .store
                    .delete_entry_audited(&id, Some(ok.clone()))
                    .await
                    .map(|_| ())
                    .map_err(|e| store_status(&e)),
            };
            match &outcome {
                // Written with the deletion.
                Ok(()) => self.audit.log_written(&[ok]),
                Err(s) => audit.push(self.audit.event(&caller, "entry.delete", &raw, s.message())),
            }
            results.push(match outcome {
                Ok(()) => pb::ItemStatus {
                    code: 0,
                    message: String::new(),
                },
                Err(s) => pb::ItemStatus {
                    code: s.code() as i32,
                    message: s.message().to_owned(),
                },
            });
        }
        self.audit.record_all(audit).await;
        self.after_entry_change().await;
        Ok(Response::new(pb::DeleteEntriesResponse { results }))
    }

    async fn count_entries(
        &self,
        req: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountEntriesResponse>, Status> {
        self.caller(&req)?;
        let count = self
            .store
            .count_entries()
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::CountEntriesResponse { count }))
    }

    async fn apply_entries(
        &self,
        req: Request<pb::ApplyEntriesRequest>,
    ) -> Result<Response<pb::ApplyEntriesResponse>, Status> {
        let caller = self.caller(&req)?;
        self.apply_registration(&caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.caller(&req)?;
        let agents = self
            .store
            .list_agents()
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(agent_message).collect(),
        }))
    }

    async fn get_agent(
        &self,
        req: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        self.caller(&req)?;
        let id = agent_id(&req.get_ref().id)?;
        let a = self
            .store
            .fetch_agent(&id)
            .await
            .map_err(|e| store_status(&e))?;
        let a = a.ok_or_else(|| agent_status(&AgentError::NotFound(id)))?;
        Ok(Response::new(agent_message(&a)))
    }

    async fn evict_agent(
        &self,
        req: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let caller = self.caller(&req)?;
        // Evicting is the only way to lift a ban: over mTLS a banned agent
        // needs the admin role, not just revoke.
        if let Some(mtls::RemoteCaller(_, role)) = req.extensions().get::<mtls::RemoteCaller>()
            && *role < AdminRole::Admin
            && agent_id(&req.get_ref().id)
                .ok()
                .and_then(|id| self.registry.agent(&id))
                .is_some_and(|a| a.banned)
        {
            let why =
                format!("role {role} may not evict a banned agent (lifts the ban; needs admin)");
            let outcome = format!("permission denied: {why}");
            self.audit
                .record(&caller, "agent.evict", &req.get_ref().id, &outcome)
                .await;
            return Err(Status::permission_denied(why));
        }
        let a = self
            .agent_op(&caller, "agent.evict", &req.get_ref().id, false)
            .await?;
        Ok(Response::new(agent_message(&a)))
    }

    async fn ban_agent(
        &self,
        req: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let caller = self.caller(&req)?;
        let a = self
            .agent_op(&caller, "agent.ban", &req.get_ref().id, true)
            .await?;
        // A banned agent's SVIDs go on the CRLs: its key may be in other
        // hands, and other agents' peers should stop trusting it now.
        crate::revocation::revoke_banned_agent(&self.revocations, &caller, &a).await;
        Ok(Response::new(agent_message(&a)))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let caller = self.caller(&req)?;
        let result = self.join_token(&caller, req.into_inner()).await;
        if let Err(status) = &result {
            self.audit
                .record(&caller, "token.generate", "", status.message())
                .await;
        }
        result.map(Response::new)
    }

    async fn get_bundle(
        &self,
        req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<node_pb::Bundle>, Status> {
        self.caller(&req)?;
        Ok(Response::new((&*self.ca.bundle()).into()))
    }

    async fn mint_x509_svid(
        &self,
        req: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<node_pb::X509Svid>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.mintable(&r.spiffe_id)?;
        let dns = r
            .dns_names
            .iter()
            .map(|d| DnsName::new(d).map_err(|e| Status::invalid_argument(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let issued = match self.ca.issue_x509_svid(&id, &dns, ttl(r.ttl)?, &r.csr) {
            Ok(i) => i,
            Err(e) => {
                let status = ca_status(&e);
                self.audit
                    .record(&caller, "svid.x509.mint", id.as_str(), status.message())
                    .await;
                return Err(status);
            }
        };
        self.audit
            .record_all(vec![self.audit.issued(
                &caller,
                "svid.x509.mint",
                id.as_str(),
                issued.expires_at,
            )])
            .await;
        Ok(Response::new(node_pb::X509Svid {
            spiffe_id: id.to_string(),
            cert_chain: issued.chain,
            expires_at: unix_i64(issued.expires_at),
            serial: issued.serial,
        }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<node_pb::NewJwtSvidResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.mintable(&r.spiffe_id)?;
        let svid = match self.ca.mint_jwt_svid(&id, &r.audience, ttl(r.ttl)?) {
            Ok(s) => s,
            Err(e) => {
                let status = ca_status(&e);
                self.audit
                    .record(&caller, "svid.jwt.mint", id.as_str(), status.message())
                    .await;
                return Err(status);
            }
        };
        self.audit
            .record_all(vec![self.audit.issued(
                &caller,
                "svid.jwt.mint",
                id.as_str(),
                svid.expiry,
            )])
            .await;
        Ok(Response::new(node_pb::NewJwtSvidResponse {
            spiffe_id: id.to_string(),
            token: svid.token,
            expires_at: unix_i64(svid.expiry),
        }))
    }

    async fn health(
        &self,
        req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.caller(&req)?;
        let entries = self
            .store
            .count_entries()
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::HealthResponse {
            trust_domain: self.trust_domain.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            bundle_sequence: self.ca.bundle().sequence,
            entries,
            agents: self.registry.agent_count() as u64,
            server_id: self.ca.config().server_id.to_string(),
        }))
    }

    async fn revoke_x509_svid(
        &self,
        req: Request<pb::RevokeX509SvidRequest>,
    ) -> Result<Response<pb::RevokeX509SvidResponse>, Status> {
        let caller = self.caller(&req)?;
        revoke::admin_revoke(self, &caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn authority_show(
        &self,
        req: Request<pb::AuthorityShowRequest>,
    ) -> Result<Response<pb::AuthorityShowResponse>, Status> {
        self.0.show_authorities(req).await
    }

    async fn authority_prepare(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityResponse>, Status> {
        self.authority_step(req, authority::Step::Prepare).await
    }

    async fn authority_activate(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityResponse>, Status> {
        self.authority_step(req, authority::Step::Activate).await
    }

    async fn authority_taint(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityResponse>, Status> {
        self.authority_step(req, authority::Step::Taint).await
    }

    async fn authority_revoke(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityResponse>, Status> {
        self.authority_step(req, authority::Step::Revoke).await
    }
}
