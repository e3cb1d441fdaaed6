//! The authority RPCs of the admin API: show every replica's CA
//! authorities, and prepare, activate, taint or revoke one of this
//! replica's. Each step is audited (`authority.<kind>.<step>`).
//!
//! A replica's authorities live in its own journal and its keys in its own
//! key manager, so a step is carried out by the replica that owns the
//! authority: a request naming another replica (`server_id`), or an id
//! found only in another replica's journal, is refused with the replica to
//! connect to. `show` reads every replica's journal from the shared
//! datastore and works from any replica.

use sigil_proto::admin as pb;
use sigil_proto::convert::unix_i64;
use tonic::{Request, Response, Status};

use super::AdminService;
use crate::ca::manager::{AuthorityKind, AuthorityView};
use crate::datastore::ServerId;
use crate::status::{authority_status, ca_status};

/// The steps that change an authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Prepare,
    Activate,
    Taint,
    Revoke,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Prepare => "prepare",
            Step::Activate => "activate",
            Step::Taint => "taint",
            Step::Revoke => "revoke",
        }
    }
}

fn kind(raw: i32) -> Result<AuthorityKind, Status> {
    match pb::AuthorityKind::try_from(raw) {
        Ok(pb::AuthorityKind::X509) => Ok(AuthorityKind::X509),
        Ok(pb::AuthorityKind::Jwt) => Ok(AuthorityKind::Jwt),
        _ => Err(Status::invalid_argument("kind must be x509 or jwt")),
    }
}

fn kind_message(k: AuthorityKind) -> pb::AuthorityKind {
    match k {
        AuthorityKind::X509 => pb::AuthorityKind::X509,
        AuthorityKind::Jwt => pb::AuthorityKind::Jwt,
    }
}

fn authority_message(v: &AuthorityView) -> pb::Authority {
    pb::Authority {
        kind: kind_message(v.kind) as i32,
        id: v.id.clone(),
        state: v.state.name().to_owned(),
        not_before: unix_i64(v.not_before),
        not_after: unix_i64(v.not_after),
        server_id: v.server_id.to_string(),
    }
}

impl AdminService {
    pub(super) async fn show_authorities(
        &self,
        req: Request<pb::AuthorityShowRequest>,
    ) -> Result<Response<pb::AuthorityShowResponse>, Status> {
        self.caller(&req)?;
        let kind = kind(req.get_ref().kind)?;
        let all = self
            .ca
            .all_authorities(kind)
            .await
            .map_err(|e| ca_status(&e))?;
        Ok(Response::new(pb::AuthorityShowResponse {
            authorities: all.iter().map(authority_message).collect(),
            server_id: self.ca.config().server_id.to_string(),
        }))
    }

    pub(super) async fn authority_step(
        &self,
        req: Request<pb::AuthorityRequest>,
        step: Step,
    ) -> Result<Response<pb::AuthorityResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let kind = kind(r.kind)?;
        let action = format!("authority.{kind}.{}", step.name());
        let target = if r.id.is_empty() {
            r.server_id.clone()
        } else {
            r.id.clone()
        };
        let outcome = self.authority_apply(kind, step, &r).await;
        let audited = match &outcome {
            Ok(v) => format!("ok: {} is {} on {}", v.id, v.state, v.server_id),
            Err(s) => s.message().to_owned(),
        };
        let target = match &outcome {
            Ok(v) => v.id.clone(),
            Err(_) => target,
        };
        self.audit.record(&caller, &action, &target, &audited).await;
        outcome.map(|v| {
            Response::new(pb::AuthorityResponse {
                authority: Some(authority_message(&v)),
            })
        })
    }

    async fn authority_apply(
        &self,
        kind: AuthorityKind,
        step: Step,
        r: &pb::AuthorityRequest,
    ) -> Result<AuthorityView, Status> {
        let own = &self.ca.config().server_id;
        if !r.server_id.is_empty() {
            let named: ServerId = r
                .server_id
                .parse()
                .map_err(|e| Status::invalid_argument(format!("server_id: {e}")))?;
            if named != *own {
                return Err(self.elsewhere(kind, &named).await);
            }
        }
        if step != Step::Prepare && r.id.trim().is_empty() {
            return Err(Status::invalid_argument(format!(
                "--id is required: the authority to {} (`sigil-server authority {kind} show` lists them)",
                step.name()
            )));
        }
        let result = match step {
            Step::Prepare => self.ca.prepare_authority(kind).await,
            Step::Activate => self.ca.activate_authority(kind, &r.id).await,
            Step::Taint => self.ca.taint_authority(kind, &r.id).await,
            Step::Revoke => self.ca.revoke_authority(kind, &r.id).await,
        };
        match result {
            Ok(v) => Ok(v),
            Err(e @ crate::ca::manager::AuthorityError::Unknown { .. }) => {
                // Not ours: perhaps another replica's.
                let id = r.id.trim().replace(':', "").to_ascii_lowercase();
                let owner = self.ca.all_authorities(kind).await.ok().and_then(|all| {
                    all.into_iter()
                        .find(|v| v.id.eq_ignore_ascii_case(&id) || v.id == r.id.trim())
                        .map(|v| v.server_id)
                });
                match owner {
                    Some(other) if other != *own => Err(self.elsewhere(kind, &other).await),
                    _ => Err(authority_status(&e)),
                }
            }
            Err(e) => Err(authority_status(&e)),
        }
    }

    /// The refusal of a step for replica `other`.
    async fn elsewhere(&self, kind: AuthorityKind, other: &ServerId) -> Status {
        let known = self
            .store
            .list_ca_journals()
            .await
            .map(|all| all.iter().any(|(id, _)| id == other))
            .unwrap_or(true);
        if known {
            Status::failed_precondition(format!(
                "that authority belongs to replica {other}, and only the replica holding its keys \
                 can change it: connect to replica {other} (its --admin-socket or --admin-address) \
                 and run the command there (this is replica {})",
                self.ca.config().server_id
            ))
        } else {
            Status::not_found(format!(
                "no replica {other}; `sigil-server authority {kind} show` lists the replicas"
            ))
        }
    }
}
