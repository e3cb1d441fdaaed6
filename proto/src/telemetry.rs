//! What the server and the agent share for observability (issue 16):
//!
//! - [`serve`]: the plain-HTTP telemetry listener with `/metrics`
//!   (Prometheus/OpenMetrics text from an explicit registry), `/live` and
//!   `/ready` (503 with a JSON reason when not ready);
//! - [`RpcLayer`]: a tower layer around the tonic services that gives each
//!   call a request id (the caller's `x-request-id`, else a new one), a
//!   tracing span carrying it, and an entry in the RPC duration histogram
//!   by service, method and gRPC code;
//! - [`request_id`] / [`in_current_request`]: the request id of the call
//!   being served, for audit records and tasks the call spawns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, warn};

/// The header a request id is read from and echoed in.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id taken from a caller; longer ones are replaced.
const MAX_REQUEST_ID: usize = 64;

tokio::task_local! {
    static REQUEST_ID: Arc<str>;
}

/// The request id of the call this task is serving, if any.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.to_string()).ok()
}

/// Runs `fut` (e.g. a task a handler spawns) in the current request's span
/// and with its request id.
pub fn in_current_request<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    let span = tracing::Span::current();
    let id = REQUEST_ID.try_with(Arc::clone).ok();
    async move {
        match id {
            Some(id) => REQUEST_ID.scope(id, fut).instrument(span).await,
            None => fut.instrument(span).await,
        }
    }
}

/// `fut` in `span`: for background tasks, `tokio::spawn(in_span(span, async { … }))`.
pub fn in_span<F: Future>(span: tracing::Span, fut: F) -> tracing::instrument::Instrumented<F> {
    fut.instrument(span)
}

/// The caller's request id if it is short and plain (letters, digits,
/// `-`, `_`, `.`), so it cannot forge log fields; else a new random one.
fn request_id_of(headers: &http::HeaderMap) -> Arc<str> {
    let given = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    match given {
        Some(v) => Arc::from(v),
        None => Arc::from(sigil_identity::random::hex(
            &sigil_identity::random::bytes::<8>(),
        )),
    }
}

/// Labels of the RPC duration histogram.
type RpcLabels = [(&'static str, String); 3];

/// The RPC duration histogram, by service, method and gRPC code.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    durations: Family<RpcLabels, Histogram, fn() -> Histogram>,
}

fn rpc_histogram() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            durations: Family::new_with_constructor(rpc_histogram),
        }
    }
}

impl RpcMetrics {
    /// Registers the histogram as `<prefix>_rpc_duration_seconds`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rpc_duration_seconds",
            "gRPC call duration until the response headers (the whole call for unary \
             methods, the time to open the stream for streaming ones), by service, method \
             and gRPC status code",
            self.durations.clone(),
        );
    }

    fn observe(&self, service: &str, method: &str, code: &str, elapsed: Duration) {
        let labels = [
            ("service", service.to_owned()),
            ("method", method.to_owned()),
            ("code", code.to_owned()),
        ];
        self.durations
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
}

/// The gRPC status code name of a numeric code.
fn code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// A tower layer for tonic servers: request id, span and RPC metrics
/// (see the module documentation). Without metrics (telemetry off) it
/// still gives every call its request id and span.
#[derive(Debug, Clone, Default)]
pub struct RpcLayer {
    metrics: Option<RpcMetrics>,
}

impl RpcLayer {
    /// A layer recording into `metrics`, if given.
    pub fn new(metrics: Option<RpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcLayer`] wraps around a tonic server.
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Option<RpcMetrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one called (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics.clone();
        let started = Instant::now();
        // "/package.Service/Method"
        let path = req.uri().path().to_owned();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", "unknown"));
        let (service, method) = (service.to_owned(), method.to_owned());
        let id = request_id_of(req.headers());
        let span = tracing::info_span!("rpc", %service, %method, request_id = %id);
        let call = REQUEST_ID.scope(id.clone(), inner.call(req));
        Box::pin(
            async move {
                let mut response = call.await?;
                if let Ok(v) = http::HeaderValue::from_str(&id) {
                    response.headers_mut().insert(REQUEST_ID_HEADER, v);
                }
                if let Some(metrics) = metrics {
                    // An error answered at once ("trailers-only") carries its
                    // status in the headers; otherwise the call has started
                    // normally and any later error is in the trailers.
                    let code = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map_or("OK", code_name);
                    if code == "UNIMPLEMENTED" {
                        // Unknown paths must not grow the label sets.
                        metrics.observe("unknown", "unknown", code, started.elapsed());
                    } else {
                        metrics.observe(&service, &method, code, started.elapsed());
                    }
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// Whether the process can serve, and why not.
pub type Readiness = Result<(), Vec<String>>;

/// What the telemetry listener asks of the process it reports on.
pub trait Health: Send + Sync + 'static {
    /// Brings the gauges that are sampled (not counted) up to date, just
    /// before the registry is encoded for a scrape.
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Ready, or the reasons it is not (each one line, e.g.
    /// `"datastore: unreachable: …"`).
    fn ready(&self) -> Pin<Box<dyn Future<Output = Readiness> + Send + '_>>;
}

/// Most telemetry connections served at once (scrapers and probes).
const MAX_CONNECTIONS: usize = 32;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the telemetry listener, with an error naming the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on the telemetry address {addr}: {e}"),
        )
    })
}

/// Serves `/metrics`, `/live` and `/ready` on `listener` until `shutdown`
/// resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: Arc<dyn Health>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "telemetry listener: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "telemetry listener busy; connection closed");
            continue;
        };
        let (registry, health) = (registry.clone(), health.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let (registry, health) = (registry.clone(), health.clone());
                async move { Ok::<_, Infallible>(answer(&req, &registry, &*health).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "telemetry connection ended with an error");
            }
        });
    }
}

fn response(status: u16, content_type: &str, body: String) -> http::Response<Full<Bytes>> {
    let mut r = http::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

async fn answer<B>(
    req: &http::Request<B>,
    registry: &Registry,
    health: &dyn Health,
) -> http::Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return response(405, JSON, r#"{"error":"only GET"}"#.into());
    }
    match req.uri().path() {
        "/metrics" => {
            health.refresh().await;
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => response(
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => response(
                    500,
                    JSON,
                    r#"{"error":"encoding the metrics failed"}"#.into(),
                ),
            }
        }
        "/live" => response(200, JSON, r#"{"status":"live"}"#.into()),
        "/ready" => match health.ready().await {
            Ok(()) => response(200, JSON, r#"{"status":"ready"}"#.into()),
            Err(reasons) => response(
                503,
                JSON,
                serde_json::json!({"status": "not ready", "reasons": reasons}).to_string(),
            ),
        },
        _ => response(
            404,
            JSON,
            r#"{"error":"not found: try /metrics, /live or /ready"}"#.into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_callers_are_taken_only_when_plain() {
        let mut h = http::HeaderMap::new();
        h.insert(REQUEST_ID_HEADER, "abc-123_x.y".parse().unwrap());
        assert_eq!(&*request_id_of(&h), "abc-123_x.y");
        h.insert(REQUEST_ID_HEADER, "a b=c".parse().unwrap());
        let id = request_id_of(&h);
        assert_ne!(&*id, "a b=c");
        assert_eq!(id.len(), 16);
        h.insert(REQUEST_ID_HEADER, "x".repeat(65).parse().unwrap());
        assert_eq!(request_id_of(&h).len(), 16);
        assert_ne!(
            request_id_of(&http::HeaderMap::new()),
            request_id_of(&http::HeaderMap::new())
        );
    }
}
