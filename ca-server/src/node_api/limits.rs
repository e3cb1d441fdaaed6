//! What the node API reads, and from whom, before it has authenticated the
//! caller.
//!
//! Every call but `Attest` is refused before its body is read unless the
//! caller presented a pinned agent SVID ([`NodeService::check_peer`]), and
//! every call's body is capped by method: the gRPC size limit is one per
//! service, and the largest message (a full batch of CSRs) would otherwise
//! be what anyone may send to any method.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, LengthLimitError, Limited};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;

use super::tls::NodeConnInfo;
use super::{MAX_BATCH, NodeService};

/// Bytes an `Attest` stream may send in all: evidence (an x509pop chain is
/// at most 4 certificates, a PSAT a few KiB), one CSR and challenge
/// responses fit many times over.
pub const ATTEST_BODY: usize = 64 * 1024;
/// Bytes of a `BatchNewX509Svid` request: 4 KiB per CSR and entry id (an
/// EC CSR is about 250 bytes, an RSA-4096 one about 1.2 KiB; the agent
/// sends at most 500 per call).
pub const BATCH_BODY: usize = MAX_BATCH * 4 * 1024;
/// Bytes of any other request: one CSR (`RenewAgent`), an entry id and
/// audiences (`NewJwtSvid`), or next to nothing (`Sync`, `FetchBundle`).
pub const SMALL_BODY: usize = 16 * 1024;
/// Concurrent HTTP/2 streams per connection. An agent holds one Sync
/// stream and a few calls at a time per connection (more wait their turn
/// in the client); this bounds what one connection can hold open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// How long `Attest` waits for its first message (the parameters).
pub const ATTEST_FIRST_MESSAGE: Duration = Duration::from_secs(10);

/// The body limit of the node API method at `path`.
fn body_limit(method: &str) -> usize {
    match method {
        "Attest" => ATTEST_BODY,
        "BatchNewX509Svid" => BATCH_BODY,
        _ => SMALL_BODY,
    }
}

/// Wraps the generated node service: checks the caller before the body is
/// read and caps the body by method.
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    node: Arc<NodeService>,
}

impl<S> Guarded<S> {
    /// Guards `inner`, checking callers against `node`'s registry.
    pub fn new(inner: S, node: Arc<NodeService>) -> Self {
        Self { inner, node }
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

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default();
        let limit = body_limit(method);
        if method != "Attest" {
            let checked = match req.extensions().get::<NodeConnInfo>() {
                Some(info) => self.node.check_peer(&info.peer).map(|_| ()),
                None => Err(Status::internal("no connection info")),
            };
            if let Err(status) = checked {
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
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
        // The clone that was made ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(ready.call(req))
    }
}
