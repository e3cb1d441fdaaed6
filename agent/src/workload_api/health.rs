//! The standard gRPC health service on the Workload API socket.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::BoxStream;
use crate::session::Session;

/// The standard gRPC health service next to the Workload API: `SERVING`
/// once the agent holds a trust bundle from the server, and NOT_SERVING
/// while the server has revoked it. It needs no
/// security header, so stock probes work.
#[derive(Debug, Clone)]
pub struct Health {
    pub(super) session: Session,
}

impl Health {
    fn status(&self, service: &str) -> Result<i32, Status> {
        use sigil_proto::grpc::health::v1::health_check_response::ServingStatus;
        if !(service.is_empty() || service == "SpiffeWorkloadAPI") {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        let cache = self.session.cache();
        let serving = cache.bundle().is_some() && cache.revoked().is_none();
        Ok(if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        } as i32)
    }
}

#[tonic::async_trait]
impl sigil_proto::grpc::health::v1::health_server::Health for Health {
    type WatchStream = BoxStream<sigil_proto::grpc::health::v1::HealthCheckResponse>;

    async fn check(
        &self,
        req: Request<sigil_proto::grpc::health::v1::HealthCheckRequest>,
    ) -> Result<Response<sigil_proto::grpc::health::v1::HealthCheckResponse>, Status> {
        let status = self.status(&req.get_ref().service)?;
        Ok(Response::new(
            sigil_proto::grpc::health::v1::HealthCheckResponse { status },
        ))
    }

    async fn watch(
        &self,
        req: Request<sigil_proto::grpc::health::v1::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = req.into_inner().service;
        let mut last = self.status(&service)?;
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let mut changes = self.session.cache().subscribe();
        tokio::spawn(async move {
            use sigil_proto::grpc::health::v1::HealthCheckResponse;
            if tx
                .send(Ok(HealthCheckResponse { status: last }))
                .await
                .is_err()
            {
                return;
            }
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                let Ok(now) = this.status(&service) else {
                    return;
                };
                if now != last {
                    last = now;
                    if tx
                        .send(Ok(HealthCheckResponse { status: now }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
