//! The client side of the Workload API, as a workload calls it: connecting
//! to an agent's socket, the header every call carries, and reading the
//! X.509-SVIDs of a reply (the `sigil-agent api …` commands and the
//! quickstart use it).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sigil_identity::x509::SvidError;
use sigil_proto::channel::{ChannelError, RpcError};
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::{X509svid, X509svidRequest, X509svidResponse};
use tonic::transport::Channel;

/// The Workload API socket could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error("cannot reach the Workload API at {}; is the agent running?", socket.display())]
pub struct ConnectError {
    /// The socket tried.
    pub socket: PathBuf,
    /// Why the connection failed.
    #[source]
    pub source: ChannelError,
}

/// A channel to the agent on the Unix socket at `socket`, for the Workload
/// API or the gRPC health service beside it.
pub async fn channel(socket: &Path) -> Result<Channel, ConnectError> {
    sigil_proto::channel::unix_channel(socket)
        .await
        .map_err(|source| ConnectError {
            socket: socket.to_path_buf(),
            source,
        })
}

/// Connects to the Workload API on the Unix socket at `socket`.
pub async fn connect(socket: &Path) -> Result<SpiffeWorkloadApiClient<Channel>, ConnectError> {
    Ok(SpiffeWorkloadApiClient::new(channel(socket).await?))
}

/// `msg` with the `workload.spiffe.io: true` header the SPIFFE Workload
/// API requires on every call.
pub fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// Why the first X.509-SVID reply could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("the agent closed the X.509-SVID stream without sending anything")]
    Ended,
}

/// Connects to `socket` and returns the first `FetchX509SVID` reply: this
/// process's X.509-SVIDs.
pub async fn fetch_x509(socket: &Path) -> Result<X509svidResponse, FetchError> {
    let mut client = connect(socket).await?;
    let mut stream = client
        .fetch_x509svid(request(X509svidRequest {}))
        .await
        .map_err(RpcError)?
        .into_inner();
    stream
        .message()
        .await
        .map_err(RpcError)?
        .ok_or(FetchError::Ended)
}

/// An X.509-SVID of a reply the agent sent that does not parse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedSvid {
    #[error("the agent sent malformed DER")]
    Der,
    #[error("the agent sent an SVID without certificates")]
    Empty,
    #[error("the agent sent an SVID whose leaf does not parse: {0}")]
    Leaf(#[from] SvidError),
}

/// One X.509-SVID of a reply, its certificates split and its leaf read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509SvidInfo {
    /// The SPIFFE ID, as the agent sent it.
    pub spiffe_id: String,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// The leaf's `notAfter`.
    pub expires_at: SystemTime,
    /// The hint the entry gave, or empty.
    pub hint: String,
    /// The certificate chain, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The CA certificates of the SVID's trust domain, DER.
    pub bundle: Vec<Vec<u8>>,
}

impl X509SvidInfo {
    /// Reads `svid` (its key is left where it is).
    pub fn read(svid: &X509svid) -> Result<Self, MalformedSvid> {
        let chain = split_der(&svid.x509_svid)?;
        let leaf = sigil_identity::x509::parse(chain.first().ok_or(MalformedSvid::Empty)?)?;
        let (_, expires_at) = sigil_identity::x509::validity(&leaf);
        let serial = sigil_identity::x509::serial_hex(&leaf);
        Ok(Self {
            spiffe_id: svid.spiffe_id.clone(),
            serial,
            expires_at,
            hint: svid.hint.clone(),
            bundle: split_der(&svid.bundle)?,
            chain,
        })
    }
}

/// Three lines for people: SPIFFE ID, serial, expiry.
impl fmt::Display for X509SvidInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SPIFFE ID : {}\nSerial    : {}\nExpires   : {}",
            self.spiffe_id,
            self.serial,
            sigil_identity::clock::rfc3339(self.expires_at)
        )
    }
}

/// Splits concatenated DER certificates.
fn split_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, MalformedSvid> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (tlv, rest) = sigil_identity::der::read(bytes).map_err(|_| MalformedSvid::Der)?;
        out.push(tlv.whole.to_vec());
        bytes = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cert(serial: u8, not_after_unix: i64) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.serial_number = Some(rcgen::SerialNumber::from(vec![serial]));
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after_unix).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_leaf_and_splits_chain_and_bundle() {
        let (leaf, ca) = (cert(0x2a, 1_798_761_600), cert(1, 1_900_000_000));
        let svid = X509svid {
            spiffe_id: "spiffe://example.org/web".into(),
            x509_svid: [leaf.clone(), ca.clone()].concat(),
            bundle: [ca.clone(), ca.clone()].concat(),
            hint: "h".into(),
            ..Default::default()
        };
        let info = X509SvidInfo::read(&svid).unwrap();
        assert_eq!(info.chain, vec![leaf, ca.clone()]);
        assert_eq!(info.bundle, vec![ca.clone(), ca]);
        assert_eq!((info.serial.as_str(), info.hint.as_str()), ("2a", "h"));
        assert_eq!(
            info.to_string(),
            "SPIFFE ID : spiffe://example.org/web\nSerial    : 2a\nExpires   : 2027-01-01T00:00:00Z"
        );
    }

    #[test]
    fn malformed_replies_are_errors() {
        let svid = |x509_svid: Vec<u8>| X509svid {
            x509_svid,
            ..Default::default()
        };
        assert!(matches!(
            X509SvidInfo::read(&svid(vec![])),
            Err(MalformedSvid::Empty)
        ));
        assert!(matches!(
            X509SvidInfo::read(&svid(vec![0x30, 0x05, 1])),
            Err(MalformedSvid::Der)
        ));
        assert!(matches!(
            X509SvidInfo::read(&svid(vec![0x30, 0x01, 0x00])),
            Err(MalformedSvid::Leaf(_))
        ));
    }
}
