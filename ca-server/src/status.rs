//! One mapping of the server's errors to gRPC status codes, used by the
//! node and admin APIs alike.

use tonic::Status;

use crate::ca::CaError;
use crate::datastore::DatastoreError;

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
