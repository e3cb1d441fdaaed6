//! The admin API over TCP with mutual TLS, for automation that does not
//! run on the server's machine (`[server] admin_bind_address`).
//!
//! The caller presents an X509-SVID of this trust domain (TLS 1.3, client
//! certificate required, verified against the current bundle by the
//! handshake). Every call is then authorized on its own, before its body
//! is read, against the state at that moment rather than at the
//! handshake: the SVID must not have expired since, and its SPIFFE ID
//! must hold the role the method needs ([`METHODS`]), from an entry with
//! `admin = true` or from `[[server.admin_ids]]`. Deleting the admin entry
//! thus takes access away from the next call, on open connections too.
//!
//! Only SVIDs of the server's own trust domain are accepted: federated
//! trust domains are not trusted here until federation exists.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::{BodyExt, LengthLimitError, Limited};
use sigil_identity::clock::Clock;
use sigil_identity::rate_limit::RateLimiter;
use sigil_identity::tls::{SharedBundle, SpiffeClientVerifier};
use sigil_identity::{AdminRole, SpiffeId, TrustDomain};
use tokio_rustls::TlsAcceptor;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tracing::{debug, warn};

use crate::audit::Audit;
use crate::node_api::tls::{NodeConnInfo, PeerSvid, ServerSvid};
use crate::registry::Registry;

/// Bytes of a batch request over mTLS (`CreateEntries`, `DeleteEntries`,
/// `ApplyEntries`): a full batch of entries of ordinary size fits.
pub const BATCH_BODY: usize = 16 * 1024 * 1024;
/// Bytes of any other request: one entry, one CSR, a few ids.
pub const SMALL_BODY: usize = 64 * 1024;

/// One admin API method as seen over mTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// The gRPC method name (`/sigil.admin.v1.Admin/<name>`).
    pub name: &'static str,
    /// The weakest role allowed to call it.
    pub role: AdminRole,
    /// The audit action of a refused call.
    pub action: &'static str,
    /// The largest request body accepted.
    pub body: usize,
}

const fn method(name: &'static str, role: AdminRole, action: &'static str, body: usize) -> Method {
    Method {
        name,
        role,
        action,
        body,
    }
}

/// Every admin API method and the role it needs over mTLS. A method not
/// listed is refused to everyone (a unit test checks that the table lists
/// every method of `admin.proto`, so a new one cannot be open by mistake).
pub const METHODS: &[Method] = {
    use AdminRole::{Admin, Read, Revoke};
    &[
        method("ListEntries", Read, "entry.list", SMALL_BODY),
        method("CountEntries", Read, "entry.count", SMALL_BODY),
        method("ListAgents", Read, "agent.list", SMALL_BODY),
        method("GetAgent", Read, "agent.show", SMALL_BODY),
        method("GetBundle", Read, "bundle.show", SMALL_BODY),
        method("Health", Read, "health", SMALL_BODY),
        method("DeleteEntries", Revoke, "entry.delete", BATCH_BODY),
        method("EvictAgent", Revoke, "agent.evict", SMALL_BODY),
        method("BanAgent", Revoke, "agent.ban", SMALL_BODY),
        method("RevokeX509Svid", Revoke, "svid.x509.revoke", SMALL_BODY),
        method("CreateEntries", Admin, "entry.create", BATCH_BODY),
        method("UpdateEntry", Admin, "entry.update", SMALL_BODY),
        method("ApplyEntries", Admin, "entry.apply", BATCH_BODY),
        method("CreateJoinToken", Admin, "token.generate", SMALL_BODY),
        method("MintX509Svid", Admin, "svid.x509.mint", SMALL_BODY),
        method("MintJwtSvid", Admin, "svid.jwt.mint", SMALL_BODY),
        method("AuthorityShow", Read, "authority.show", SMALL_BODY),
        method("AuthorityPrepare", Admin, "authority.prepare", SMALL_BODY),
        method("AuthorityActivate", Admin, "authority.activate", SMALL_BODY),
        method("AuthorityTaint", Revoke, "authority.taint", SMALL_BODY),
        method("AuthorityRevoke", Revoke, "authority.revoke", SMALL_BODY),
    ]
};

/// The method named `name`, if the table lists it.
pub fn lookup(name: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.name == name)
}

/// The caller of a call over mTLS, put in the request's extensions once
/// the call is authorized; the handlers audit under its SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCaller(pub SpiffeId, pub AdminRole);

/// Longest method name written to logs and the audit log: the name comes
/// from the request path, which the caller chooses.
const SHOWN_METHOD: usize = 128;

/// `method` as logged: cut to [`SHOWN_METHOD`] bytes on a char boundary.
fn shown_method(method: &str) -> &str {
    if method.len() <= SHOWN_METHOD {
        return method;
    }
    let mut end = SHOWN_METHOD;
    while !method.is_char_boundary(end) {
        end -= 1;
    }
    &method[..end]
}

/// Decides who may call what over mTLS.
pub struct RemoteAuth {
    registry: Arc<Registry>,
    /// `[[server.admin_ids]]`.
    configured: HashMap<SpiffeId, AdminRole>,
    clock: Arc<dyn Clock>,
    audit: Audit,
    limit: RateLimiter<SpiffeId>,
}

impl std::fmt::Debug for RemoteAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteAuth")
            .field("configured", &self.configured)
            .finish_non_exhaustive()
    }
}

impl RemoteAuth {
    /// Roles from `registry` and `configured`; `limit` calls per caller.
    pub fn new(
        registry: Arc<Registry>,
        configured: impl IntoIterator<Item = (SpiffeId, AdminRole)>,
        clock: Arc<dyn Clock>,
        audit: Audit,
        limit: RateLimiter<SpiffeId>,
    ) -> Self {
        let mut roles: HashMap<SpiffeId, AdminRole> = HashMap::new();
        for (id, role) in configured {
            let r = roles.entry(id).or_insert(role);
            *r = (*r).max(role);
        }
        Self {
            registry,
            configured: roles,
            clock,
            audit,
            limit,
        }
    }

    /// The role `id` holds now: the strongest of its configured role and
    /// its current admin entries.
    pub fn role(&self, id: &SpiffeId) -> Option<AdminRole> {
        let from_entries = self.registry.admin_role(id, self.clock.now());
        from_entries.max(self.configured.get(id).copied())
    }

    /// Authorizes one call of `method` on a connection whose client
    /// certificate is `peer`: the caller's SPIFFE ID, or the status to
    /// answer with. Refusals of a known caller are audited.
    pub async fn authorize(
        &self,
        peer: &PeerSvid,
        method: &str,
    ) -> Result<(SpiffeId, AdminRole), Status> {
        // Known names are short: cutting never changes the lookup below.
        let method = shown_method(method);
        let PeerSvid::Svid { id, not_after, .. } = peer else {
            // The handshake requires an SVID; nothing else gets here.
            return Err(Status::unauthenticated(
                "the admin API over mTLS needs an X509-SVID as client certificate",
            ));
        };
        // First, so that refusals (each an audit write) are limited too.
        if !self.limit.try_take(id, 1.0, Instant::now()) {
            debug!(spiffe_id = %id, method, "admin API call over mTLS rate limited");
            return Err(Status::resource_exhausted(
                "too many admin API calls from this SPIFFE ID; retry later",
            ));
        }
        let found = lookup(method);
        let action = found.map_or("admin.call", |m| m.action);
        if *not_after <= self.clock.now() {
            let outcome = "unauthenticated: the client SVID has expired";
            self.audit
                .record(id.as_str(), action, method, outcome)
                .await;
            return Err(Status::unauthenticated(
                "the client SVID has expired; fetch a fresh one and reconnect",
            ));
        }
        let role = self.role(id);
        let refused = match (found, role) {
            (None, _) => Some(format!("method {method:?} is not open over mTLS")),
            (Some(_), None) => Some(format!("{id} holds no admin role")),
            (Some(m), Some(r)) if r < m.role => {
                Some(format!("role {r} may not {} (needs {})", m.action, m.role))
            }
            (Some(_), Some(_)) => None,
        };
        let role = match (refused, role) {
            (None, Some(role)) => role,
            (refused, _) => {
                let why = refused.unwrap_or_else(|| format!("{id} holds no admin role"));
                warn!(spiffe_id = %id, method, reason = %why, "admin API call over mTLS refused");
                let outcome = format!("permission denied: {why}");
                self.audit
                    .record(id.as_str(), action, method, &outcome)
                    .await;
                return Err(Status::permission_denied(why));
            }
        };
        Ok((id.clone(), role))
    }
}

/// Wraps the generated admin service on the TCP listener: authorizes every
/// call before its body is read, and caps the body by method.
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    auth: Arc<RemoteAuth>,
}

impl<S> Guarded<S> {
    /// Guards `inner` with `auth`.
    pub fn new(inner: S, auth: Arc<RemoteAuth>) -> Self {
        Self { inner, auth }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tower::Service<http::Request<Body>> for Guarded<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone that was made ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let method = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            let peer = req
                .extensions()
                .get::<NodeConnInfo>()
                .map(|i| i.peer.clone());
            let authorized = match peer {
                Some(peer) => auth.authorize(&peer, &method).await,
                None => Err(Status::internal("no connection info")),
            };
            let (id, role) = match authorized {
                Ok(ok) => ok,
                Err(status) => return Ok(status.into_http()),
            };
            req.extensions_mut().insert(RemoteCaller(id, role));
            // Unknown methods were refused above.
            let limit = lookup(&method).map_or(0, |m| m.body);
            let req = req.map(|body| {
                Body::new(Limited::new(body, limit).map_err(move |e| {
                    if e.is::<LengthLimitError>() {
                        Status::resource_exhausted(format!(
                            "request larger than this method's limit of {limit} bytes"
                        ))
                        .into()
                    } else {
                        e
                    }
                }))
            });
            ready.call(req).await
        })
    }
}

/// The TLS acceptor of the admin listener: TLS 1.3, the server's SVID, a
/// client X509-SVID of `trust_domain` required.
pub fn acceptor(
    server_svid: &ServerSvid,
    bundle: Arc<SharedBundle>,
    trust_domain: TrustDomain,
) -> Result<TlsAcceptor, rustls::Error> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        bundle,
        Arc::new(move |id: &SpiffeId| id.is_member_of(&trust_domain)),
        true,
    ));
    let cfg = sigil_identity::tls::server_config(server_svid.resolver(), verifier)?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rpc names declared in `admin.proto`.
    fn proto_methods() -> Vec<String> {
        let proto = include_str!("../../../proto/proto/sigil/admin/v1/admin.proto");
        proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split(['(', ' ']).next().unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn long_method_names_are_cut_for_logs() {
        assert_eq!(shown_method("ListEntries"), "ListEntries");
        let long = "x".repeat(10_000);
        assert_eq!(shown_method(&long).len(), SHOWN_METHOD);
        // A multi-byte char across the limit is dropped whole.
        let wide = format!("{}é{}", "a".repeat(SHOWN_METHOD - 1), "b".repeat(50));
        assert_eq!(shown_method(&wide), "a".repeat(SHOWN_METHOD - 1));
    }

    #[test]
    fn every_admin_method_has_a_role() {
        let declared = proto_methods();
        assert!(declared.len() >= 15, "parsed {declared:?}");
        for name in &declared {
            assert!(
                lookup(name).is_some(),
                "admin.proto method {name} is missing from mtls::METHODS: give it a role"
            );
        }
        for m in METHODS {
            assert!(
                declared.iter().any(|d| d == m.name),
                "{} is in METHODS but not in admin.proto",
                m.name
            );
        }
    }

    #[test]
    fn roles_follow_the_issue() {
        let role = |n: &str| lookup(n).unwrap().role;
        for read in [
            "ListEntries",
            "CountEntries",
            "ListAgents",
            "GetAgent",
            "GetBundle",
        ] {
            assert_eq!(role(read), AdminRole::Read, "{read}");
        }
        for revoke in ["DeleteEntries", "EvictAgent", "BanAgent", "RevokeX509Svid"] {
            assert_eq!(role(revoke), AdminRole::Revoke, "{revoke}");
        }
        for admin in [
            "CreateEntries",
            "UpdateEntry",
            "ApplyEntries",
            "MintX509Svid",
        ] {
            assert_eq!(role(admin), AdminRole::Admin, "{admin}");
        }
        assert!(lookup("Unknown").is_none());
    }

    #[test]
    fn authority_roles_split_reading_rotating_and_incident_response() {
        let role = |n: &str| lookup(n).unwrap().role;
        assert_eq!(role("AuthorityShow"), AdminRole::Read);
        assert_eq!(role("AuthorityPrepare"), AdminRole::Admin);
        assert_eq!(role("AuthorityActivate"), AdminRole::Admin);
        assert_eq!(role("AuthorityTaint"), AdminRole::Revoke);
        assert_eq!(role("AuthorityRevoke"), AdminRole::Revoke);
    }
}
