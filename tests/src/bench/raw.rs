//! The raw limits Sigil's numbers are compared with, measured in the same
//! run: ring ECDSA P-256 loops (what issuing and minting must do at least),
//! and a bare tonic server-streaming RPC over a Unix socket in this process
//! (what any Workload API round trip costs before Sigil does anything).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::*;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Distinct keys in the ECDSA loops: verification time depends on the
/// signature, so one repeated signature would not be representative.
const POOL: usize = 64;

fn ecdsa_key(alg: &'static signature::EcdsaSigningAlgorithm) -> Result<EcdsaKeyPair> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng)
        .map_err(|_| anyhow!("ring could not generate a P-256 key"))?;
    EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow!("ring rejected its own P-256 key"))
}

/// Mean time of one ring P-256 verify plus one sign (ASN.1, as a CSR check
/// and a certificate signature are), single-threaded, over `duration`.
pub fn verify_plus_sign(duration: Duration) -> Result<Duration> {
    let rng = SystemRandom::new();
    let msg = vec![0x5au8; 300];
    let mut keys = Vec::with_capacity(POOL);
    for _ in 0..POOL {
        let key = ecdsa_key(&signature::ECDSA_P256_SHA256_ASN1_SIGNING)?;
        let sig = key
            .sign(&rng, &msg)
            .map_err(|_| anyhow!("ring signing failed"))?
            .as_ref()
            .to_vec();
        let public = UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_ASN1,
            key.public_key().as_ref().to_vec(),
        );
        keys.push((key, public, sig));
    }
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        for (key, public, sig) in &keys {
            public
                .verify(&msg, sig)
                .map_err(|_| anyhow!("ring rejected a valid signature"))?;
            std::hint::black_box(
                key.sign(&rng, &msg)
                    .map_err(|_| anyhow!("ring signing failed"))?,
            );
        }
        n += POOL as u64;
    }
    Ok(started.elapsed() / n.max(1) as u32)
}

/// Mean time of one ring P-256 sign in the fixed (JWS) encoding over a
/// JWT-sized message, single-threaded, over `duration`.
pub fn sign_fixed(duration: Duration) -> Result<Duration> {
    let rng = SystemRandom::new();
    let key = ecdsa_key(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)?;
    let msg = vec![0x5au8; 250];
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < duration {
        for _ in 0..POOL {
            std::hint::black_box(
                key.sign(&rng, &msg)
                    .map_err(|_| anyhow!("ring signing failed"))?,
            );
        }
        n += POOL as u32;
    }
    Ok(started.elapsed() / n.max(1))
}

/// The number of cores the machine offers this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` on a blocking thread.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("measuring thread failed: {e}"))?
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A bare Workload API server: no attestation, no cache, no header check.
/// FetchX509SVID sends a canned response, then ends with PermissionDenied
/// when [`BareServer::revoke`] is called; every other method is
/// unimplemented.
#[derive(Debug)]
struct Bare {
    response: X509svidResponse,
    revoked: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Bare {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let (tx, rx) = mpsc::channel(1);
        let first = self.response.clone();
        let mut revoked = self.revoked.clone();
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            tokio::select! {
                () = tx.closed() => {}
                ok = async { revoked.wait_for(|r| *r).await.is_ok() } => if ok {
                    let _ = tx.send(Err(Status::permission_denied("revoked"))).await;
                },
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_x509_bundles(
        &self,
        _req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("bare server"))
    }

    async fn fetch_jwtsvid(
        &self,
        _req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("bare server"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("bare server"))
    }

    async fn validate_jwtsvid(
        &self,
        _req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("bare server"))
    }
}

/// A bare tonic Workload API server on a Unix socket in this process.
#[derive(Debug)]
pub struct BareServer {
    socket: PathBuf,
    revoke: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl BareServer {
    /// Serves `response` on `dir/bare.sock`.
    pub fn start(dir: &Path, response: X509svidResponse) -> Result<Self> {
        let socket = dir.join("bare.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|e| anyhow!("cannot bind {}: {e}", socket.display()))?;
        let (revoke, revoked) = watch::channel(false);
        let service = SpiffeWorkloadApiServer::new(Bare { response, revoked });
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("bare tonic server failed: {e}");
            }
        });
        Ok(Self {
            socket,
            revoke,
            task,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Ends every open stream (and every later one after its first message).
    pub fn revoke(&self) {
        self.revoke.send_replace(true);
    }

    /// Makes new streams stay open again.
    pub fn reset(&self) {
        self.revoke.send_replace(false);
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
