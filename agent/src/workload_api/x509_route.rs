//! The Workload API service as served: the generated gRPC service, except
//! that `FetchX509SVID` streams are answered here, with a response body
//! that writes each `X509SVIDResponse` from its parts a piece at a time
//! ([`super::x509_wire`]) instead of through the generated code, which
//! would build and encode each whole message first.
//!
//! The request itself (`X509SVIDRequest`) has no fields and is not read.
//! Errors before the first response are sent as a trailers-only response,
//! later ones in the trailers, as the generated code does.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use sigil_proto::workload::X509svidRequest;
use sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio_stream::Stream;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use super::x509_wire::{Writer, X509Parts};
use super::{BoxStream, WorkloadApi};

/// The gRPC path of `FetchX509SVID`.
const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// See the module documentation.
#[derive(Debug, Clone)]
pub(super) struct WorkloadService {
    api: WorkloadApi,
    generated: SpiffeWorkloadApiServer<WorkloadApi>,
}

impl WorkloadService {
    pub(super) fn new(api: WorkloadApi, generated: SpiffeWorkloadApiServer<WorkloadApi>) -> Self {
        Self { api, generated }
    }
}

impl NamedService for WorkloadService {
    const NAME: &'static str = <SpiffeWorkloadApiServer<WorkloadApi> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for WorkloadService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != FETCH_X509_SVID {
            return self.generated.call(req);
        }
        let api = self.api.clone();
        Box::pin(async move {
            let (parts, _body) = req.into_parts();
            let request = tonic::Request::from_parts(
                MetadataMap::from_headers(parts.headers),
                parts.extensions,
                X509svidRequest {},
            );
            Ok(match api.x509_stream(&request).await {
                Ok(stream) => {
                    let mut response = http::Response::new(Body::new(X509Body {
                        stream,
                        writer: None,
                        done: false,
                    }));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    response
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

/// The body of a `FetchX509SVID` response: each state from `stream`,
/// written piece by piece as the connection asks for data; the stream's
/// error (or its end) in the trailers.
struct X509Body {
    stream: BoxStream<X509Parts>,
    writer: Option<Writer>,
    done: bool,
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut map = http::HeaderMap::new();
    // A message that is not a valid header value is sent percent-encoded;
    // add_header fails only on details that cannot be encoded, which a
    // status built here never has.
    let _ = status.add_header(&mut map);
    Frame::trailers(map)
}

impl http_body::Body for X509Body {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(writer) = &mut this.writer {
                match writer.next_chunk() {
                    Some(chunk) => return Poll::Ready(Some(Ok(Frame::data(chunk)))),
                    None => this.writer = None,
                }
            }
            match Pin::new(&mut this.stream).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(parts))) => this.writer = Some(parts.into_writer()),
                Poll::Ready(Some(Err(status))) => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(trailers(&status))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(trailers(&Status::ok("")))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
