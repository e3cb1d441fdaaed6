//! One mapping of the server's errors to gRPC status codes, used by the
//! node and admin APIs alike.

use sigil_identity::attestation::AttestError;
use tonic::Status;

use crate::agents::AgentError;
use crate::ca::CaError;
use crate::datastore::DatastoreError;

/// Marks `status` as revoking the calling agent (see
/// [`sigil_proto::REVOKED_METADATA`]).
pub fn revoked(mut status: Status) -> Status {
    status.metadata_mut().insert(
        sigil_proto::REVOKED_METADATA,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    status
}

/// Maps CA failures to gRPC status codes, in one place.
pub fn ca_status(e: &CaError) -> Status {
    match e {
        CaError::Csr(e) => Status::invalid_argument(format!("bad CSR: {e}")),
        CaError::Jwt(e) => Status::invalid_argument(e.to_string()),
        // Too long to validate: the request's audiences are the cause.
        CaError::JwtSelfCheck(sigil_identity::jwt::JwtError::Jws(
            sigil_identity::jws::JwsError::TooLong,
        )) => Status::invalid_argument(e.to_string()),
        CaError::ForeignId(..) => Status::invalid_argument(e.to_string()),
        CaError::NotReady => Status::unavailable(e.to_string()),
        _ => Status::internal("the CA could not sign; see the server log"),
    }
}

/// Maps datastore failures to gRPC status codes.
pub fn store_status(e: &DatastoreError) -> Status {
    match e {
        DatastoreError::NotFound(what) => Status::not_found(format!("{what} not found")),
        DatastoreError::AlreadyExists(what) => {
            Status::already_exists(format!("{what} already exists"))
        }
        _ => Status::unavailable(format!("datastore: {e}")),
    }
}

/// Maps agent lifecycle failures ([`crate::agents`]) to gRPC status codes.
/// An agent whose record is gone or banned is told it is revoked.
pub fn agent_status(e: &AgentError) -> Status {
    match e {
        AgentError::NotFound(_) => Status::not_found(e.to_string()),
        AgentError::Evicted | AgentError::Banned => {
            revoked(Status::permission_denied(e.to_string()))
        }
        AgentError::Store(e) => store_status(e),
        AgentError::NotAgentSvid
        | AgentError::SvidExpired
        | AgentError::Superseded
        | AgentError::Unknown
        | AgentError::BannedFromAttesting
        | AgentError::NoReattestation
        | AgentError::AlreadyAttested
        | AgentError::EvictedWhileAttesting => Status::permission_denied(e.to_string()),
    }
}

/// Maps a failed node attestation: the agent learns little (the log and
/// the audit record say more).
pub fn attest_status(e: &AttestError) -> Status {
    match e {
        AttestError::Internal(_) => Status::unavailable("attestation could not be completed"),
        AttestError::Malformed(_) => Status::invalid_argument(e.to_string()),
        _ => Status::permission_denied("attestation failed"),
    }
}
