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

/// Maps refused or failed authority commands to gRPC status codes: a
/// refused transition is a failed precondition whose message names the rule.
pub fn authority_status(e: &crate::ca::manager::AuthorityError) -> Status {
    use crate::ca::manager::AuthorityError as E;
    match e {
        E::Unknown { .. } => Status::not_found(e.to_string()),
        E::NotPublished { .. } => Status::unavailable(e.to_string()),
        E::Ca(CaError::Datastore(d)) => store_status(d),
        E::Ca(c) => ca_status(c),
        _ => Status::failed_precondition(e.to_string()),
    }
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
        // The message says the change was not made and may be retried.
        DatastoreError::Unavailable(_) => Status::unavailable(e.to_string()),
        _ => Status::unavailable(format!("datastore: {e}")),
    }
}

/// Maps the failure of an all-or-nothing write (`ApplyEntries`): an entry
/// that already exists means none of the batch was written.
pub fn batch_status(e: &DatastoreError) -> Status {
    match e {
        DatastoreError::AlreadyExists(what) => {
            Status::already_exists(format!("{what} already exists; nothing was changed"))
        }
        e => store_status(e),
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

#[cfg(test)]
mod tests {
    use sigil_identity::{AgentId, TrustDomain};
    use tonic::Code;

    use super::*;

    fn is_revoked(s: &Status) -> bool {
        s.metadata().get(sigil_proto::REVOKED_METADATA).is_some()
    }

    #[test]
    fn an_unreachable_database_is_unavailable_and_says_nothing_changed() {
        let s = store_status(&DatastoreError::Unavailable("connection refused".into()));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("no change was made"), "{s:?}");
        let s = agent_status(&AgentError::Store(DatastoreError::Unavailable("x".into())));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            batch_status(&DatastoreError::Unavailable("x".into())).code(),
            Code::Unavailable
        );
    }

    #[test]
    fn only_a_gone_or_banned_agent_is_told_it_is_revoked() {
        let td = TrustDomain::new("example.org").unwrap();
        let id = AgentId::from_segments(&td, &["join_token", "a"]).unwrap();
        for e in [AgentError::Evicted, AgentError::Banned] {
            let s = agent_status(&e);
            assert_eq!(s.code(), Code::PermissionDenied);
            assert!(is_revoked(&s), "{e:?}");
        }
        for e in [
            AgentError::Superseded,
            AgentError::SvidExpired,
            AgentError::BannedFromAttesting,
            AgentError::AlreadyAttested,
        ] {
            let s = agent_status(&e);
            assert_eq!(s.code(), Code::PermissionDenied);
            assert!(!is_revoked(&s), "{e:?}");
        }
        let s = agent_status(&AgentError::NotFound(id));
        assert_eq!(s.code(), Code::NotFound);
        assert!(!is_revoked(&s));
    }
}
