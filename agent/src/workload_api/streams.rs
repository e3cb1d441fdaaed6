//! The SPIFFE Workload API calls: X.509-SVID, X.509 bundle and JWT bundle
//! streams (full state at once, again on every change), and the unary
//! JWT-SVID fetch and validation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use sigil_identity::{Bundle, SelectorSet, SpiffeId, TrustDomain, jwt};
use sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use sigil_proto::workload::*;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::warn;

use super::caller::{Caller, Recheck, check_header};
use super::connection::Slot;
use super::x509_wire::X509Parts;
use super::{BoxStream, ISSUANCE_WAIT, WorkloadApi};
use crate::cache::CachedSvid;

impl WorkloadApi {
    /// The SVIDs for `selectors`, waiting briefly for ones still being issued.
    pub(super) async fn x509_state(
        &self,
        selectors: &SelectorSet,
    ) -> Result<Vec<Arc<CachedSvid>>, Status> {
        let mut changes = self.session.cache().subscribe();
        let deadline = tokio::time::Instant::now() + ISSUANCE_WAIT;
        loop {
            let (entries, svids) = self.identities(selectors);
            if entries.is_empty() {
                return Err(self.no_identity("no identity is registered for this workload"));
            }
            if svids.len() >= entries.len()
                || (!svids.is_empty() && tokio::time::Instant::now() >= deadline)
            {
                return Ok(svids);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return if svids.is_empty() {
                    Err(Status::unavailable(
                        "identities are still being issued; retry",
                    ))
                } else {
                    Ok(svids)
                };
            }
        }
    }

    pub(super) fn bundle(&self) -> Result<Arc<Bundle>, Status> {
        self.session
            .cache()
            .bundle()
            .ok_or_else(|| Status::unavailable("the agent has no trust bundle yet"))
    }

    /// Streams `make()` now and whenever the cache changes and the value
    /// differs; ends with the error `make` returns. With `recheck`, the
    /// caller is attested again before each update is sent (not when
    /// nothing is sent: an unchanged value, or an error ending the stream,
    /// discloses nothing), and the stream ends if it is not the same.
    fn watch_stream<T, F>(
        &self,
        slot: Slot,
        first: T,
        make: F,
        recheck: Option<Recheck>,
    ) -> BoxStream<T>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(&WorkloadApi) -> Result<Option<T>, Status> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let mut changes = self.session.cache().subscribe();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                match make(&this) {
                    Ok(None) => {}
                    Ok(Some(next)) if next == last => {}
                    Ok(Some(next)) => {
                        if let Some(r) = &recheck
                            && let Err(status) = this.recheck(r).await
                        {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        last = next.clone();
                        if tx.send(Ok(next)).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// The key of a bundle in the Workload API's bundle maps: the SPIFFE ID of
/// its trust domain (`spiffe://example.org`), as the specification says.
fn bundle_key(b: &Bundle) -> String {
    b.trust_domain.id().to_string()
}

/// The `X509SVIDResponse` for `svids` under `bundle`, with the trust
/// domain's CRLs and the bundles of the trust domains the SVIDs' entries
/// federate with (see [`X509Parts`]).
fn x509_parts(api: &WorkloadApi, svids: Vec<Arc<CachedSvid>>, bundle: &Bundle) -> X509Parts {
    let federated = api.federated_for_svids(&svids);
    let mut parts = X509Parts::new(svids, Bytes::from(bundle.x509_authorities.concat()));
    // The trust domain's CRLs, one per CA, DER (see `crate::crl`).
    parts.crl = api
        .session
        .cache()
        .crls()
        .ders()
        .into_iter()
        .map(Bytes::from)
        .collect();
    parts.federated_bundles = federated
        .iter()
        .map(|b| (bundle_key(b), Bytes::from(b.x509_authorities.concat())))
        .collect();
    parts
}

/// A bundle's JWT authorities only, as a JWK Set: clients reject x509-svid
/// keys (which carry no kid) in a JWT bundle.
fn jwt_only(b: &Bundle) -> Vec<u8> {
    Bundle {
        x509_authorities: Vec::new(),
        ..b.clone()
    }
    .to_jwks_bytes()
}

impl WorkloadApi {
    /// The federated bundles the SVIDs' entries federate with.
    fn federated_for_svids(&self, svids: &[Arc<CachedSvid>]) -> Vec<Arc<Bundle>> {
        self.session
            .cache()
            .federated_for(svids.iter().map(|s| &*s.entry))
    }

    /// The federated bundles the entries matching `selectors` federate with.
    fn federated_for_selectors(&self, selectors: &SelectorSet) -> Vec<Arc<Bundle>> {
        let (entries, _) = self.identities(selectors);
        self.session
            .cache()
            .federated_for(entries.iter().map(|e| &**e))
    }

    /// A `FetchX509SVID` stream: the caller's SVIDs now and after every
    /// change, as response parts ([`super::x509_route`] writes them).
    pub(super) async fn x509_stream<T>(
        &self,
        req: &Request<T>,
    ) -> Result<BoxStream<X509Parts>, Status> {
        let Caller {
            uid,
            selectors,
            pid,
            origin,
        } = self.caller(req).await?;
        let slot = self.open_stream(uid)?;
        let svids = self.x509_state(&selectors).await?;
        let first = x509_parts(self, svids, &*self.bundle()?);
        let make = move |api: &WorkloadApi| {
            let (entries, svids) = api.identities(&selectors);
            if entries.is_empty() {
                return Err(api.no_identity("no identity is registered for this workload any more"));
            }
            if svids.is_empty() {
                return Ok(None); // re-issuance in progress: send when it lands
            }
            Ok(Some(x509_parts(api, svids, &*api.bundle()?)))
        };
        // Each update goes only to the process that opened the stream: it
        // is attested again before anything is sent (and only then, so a
        // change that sends nothing, or a revocation, costs no /proc reads).
        let recheck = Recheck { uid, pid, origin };
        Ok(self.watch_stream(slot, first, make, Some(recheck)))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    /// Served by [`super::x509_route`] from the same stream; this is the
    /// generated service's entry point, answering with the same messages.
    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let parts = self.x509_stream(&req).await?;
        Ok(Response::new(Box::pin(
            parts.map(|r| r.map(|p| p.to_message())),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let Caller { uid, selectors, .. } = self.caller(&req).await?;
        let slot = self.open_stream(uid)?;
        self.x509_state(&selectors).await?;
        let make = move |api: &WorkloadApi| -> Result<X509BundlesResponse, Status> {
            let b = api.bundle()?;
            let mut bundles: HashMap<String, Vec<u8>> =
                [(bundle_key(&b), b.x509_authorities.concat())].into();
            for f in api.federated_for_selectors(&selectors) {
                bundles.insert(bundle_key(&f), f.x509_authorities.concat());
            }
            Ok(X509BundlesResponse {
                crl: api.session.cache().crls().ders(),
                bundles,
            })
        };
        let first = make(self)?;
        Ok(Response::new(self.watch_stream(
            slot,
            first,
            move |api| make(api).map(Some),
            None,
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&req)?;
        self.unary_allowed(&req)?;
        let Caller { uid, selectors, .. } = self.caller(&req).await?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience is required"));
        }
        if r.audience.len() > jwt::MAX_AUDIENCES || r.audience.iter().any(|a| a.len() > 256) {
            return Err(Status::invalid_argument(
                "at most 32 audiences of at most 256 bytes",
            ));
        }
        let (entries, _) = self.identities(&selectors);
        let wanted: Vec<_> = if r.spiffe_id.is_empty() {
            entries
        } else {
            let id = SpiffeId::parse(&r.spiffe_id).map_err(|e| {
                Status::invalid_argument(format!("spiffe_id is not a valid SPIFFE ID: {e}"))
            })?;
            entries.into_iter().filter(|e| e.spiffe_id == id).collect()
        };
        if wanted.is_empty() {
            return Err(self.no_identity("no matching identity for this workload"));
        }
        let mut svids = Vec::with_capacity(wanted.len());
        for e in wanted {
            if !self.session.has_fresh_jwt(&e, &r.audience)
                && !self.jwt_fetches.try_take(&uid, 1.0, Instant::now())
            {
                warn!(uid, "JWT-SVID fetch limit reached for this uid");
                return Err(Status::resource_exhausted(
                    "this user has asked for too many new JWT-SVIDs (audiences); retry in a few \
                     seconds or reuse the tokens already fetched",
                ));
            }
            let token = self.session.jwt_svid(&e, &r.audience).await.map_err(|e| {
                warn!(error = %e, "JWT-SVID unavailable");
                Status::unavailable("JWT-SVID could not be obtained from the server; retry")
            })?;
            svids.push(Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let Caller { uid, selectors, .. } = self.caller(&req).await?;
        let slot = self.open_stream(uid)?;
        self.x509_state(&selectors).await?;
        let make = move |api: &WorkloadApi| -> Result<JwtBundlesResponse, Status> {
            let b = api.bundle()?;
            let mut bundles: HashMap<String, Vec<u8>> = [(bundle_key(&b), jwt_only(&b))].into();
            for f in api.federated_for_selectors(&selectors) {
                bundles.insert(bundle_key(&f), jwt_only(&f));
            }
            Ok(JwtBundlesResponse { bundles })
        };
        let first = make(self)?;
        Ok(Response::new(self.watch_stream(
            slot,
            first,
            move |api| make(api).map(Some),
            None,
        )))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        self.unary_allowed(&req)?;
        let caller_selectors = async {
            let Caller { selectors, .. } = self.caller(&req).await?;
            Ok::<_, Status>(selectors)
        };
        let r = req.get_ref().clone();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid is required"));
        }
        let bundle = self.bundle()?;
        // The caller's own trust domain, and the federated ones its entries
        // federate with (read only when the token is from elsewhere).
        let mut trusted: HashMap<TrustDomain, Bundle> =
            [(bundle.trust_domain.clone(), (*bundle).clone())].into();
        if jwt_trust_domain(&r.svid).is_some_and(|td| td != bundle.trust_domain) {
            let selectors = caller_selectors.await?;
            for f in self.federated_for_selectors(&selectors) {
                trusted.insert(f.trust_domain.clone(), (*f).clone());
            }
        }
        let v = jwt::validate(
            &r.svid,
            &[r.audience.as_str()],
            &trusted,
            self.session.now(),
        )
        .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
        use prost_types::value::Kind;
        let num = |t: SystemTime| prost_types::Value {
            kind: Some(Kind::NumberValue(
                sigil_identity::clock::unix_seconds(t) as f64
            )),
        };
        let text = |s: &str| prost_types::Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("sub".to_owned(), text(v.spiffe_id.as_str()));
        fields.insert(
            "aud".to_owned(),
            prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: v.audience.iter().map(|a| text(a)).collect(),
                })),
            },
        );
        fields.insert("exp".to_owned(), num(v.expiry));
        if let Some(iat) = v.issued_at {
            fields.insert("iat".to_owned(), num(iat));
        }
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(prost_types::Struct {
                fields: fields.into_iter().collect(),
            }),
        }))
    }
}

/// The trust domain of a token's `sub`, read without verifying anything
/// (only to choose which bundles to offer the validator).
fn jwt_trust_domain(token: &str) -> Option<TrustDomain> {
    use sigil_identity::jws;
    let claims = jws::parse(token, jws::Alg::ALL)
        .ok()?
        .unverified_claims()
        .ok()?;
    let sub = SpiffeId::parse(claims.get("sub")?.as_str()?).ok()?;
    Some(sub.trust_domain())
}
