//! The admin API's `RevokeX509Svid`: parses the request (a serial or an
//! entry, and a reason) and hands it to [`crate::revocation::Revocations`].

use crate::datastore::RevocationReason;
use crate::revocation::RevokeError;

/// The admin API's `RevokeX509Svid`.
pub(super) async fn admin_revoke(
    admin: &super::AdminService,
    caller: &str,
    r: sigil_proto::admin::RevokeX509SvidRequest,
) -> Result<sigil_proto::admin::RevokeX509SvidResponse, tonic::Status> {
    use tonic::Status;
    let reason = if r.reason.is_empty() {
        RevocationReason::Unspecified
    } else {
        RevocationReason::parse(&r.reason).ok_or_else(|| {
            let names: Vec<_> = RevocationReason::ALL.iter().map(|(n, _)| *n).collect();
            Status::invalid_argument(format!(
                "unknown revocation reason {:?}; use one of: {}",
                r.reason,
                names.join(", ")
            ))
        })?
    };
    let revocations = &admin.revocations;
    let result = match (r.serial.is_empty(), r.entry_id.is_empty()) {
        (false, true) => revocations.revoke_serial(caller, &r.serial, reason).await,
        (true, false) => {
            let id = sigil_identity::EntryId::new(&r.entry_id)
                .map_err(|e| Status::invalid_argument(format!("entry id: {e}")))?;
            let entry = admin
                .store
                .fetch_entry(&id)
                .await
                .map_err(|e| crate::status::store_status(&e))?
                .ok_or_else(|| Status::not_found(format!("no entry with id {id}")))?;
            revocations
                .revoke_spiffe_id(caller, &entry.spiffe_id, reason)
                .await
        }
        _ => {
            return Err(Status::invalid_argument(
                "give exactly one of --serial and --entry",
            ));
        }
    };
    let revoked = result.map_err(|e| match e {
        RevokeError::UnknownSerial(_) => Status::not_found(e.to_string()),
        RevokeError::BadSerial(_) => Status::invalid_argument(e.to_string()),
        RevokeError::Store(e) => crate::status::store_status(&e),
    })?;
    Ok(sigil_proto::admin::RevokeX509SvidResponse {
        revoked: revoked
            .iter()
            .map(|r| sigil_proto::admin::RevokeX509SvidResult {
                serial: r.serial.clone(),
                spiffe_id: r.spiffe_id.to_string(),
                issuer: r.issuer.clone(),
                expires_at: sigil_proto::convert::unix_i64(r.not_after),
            })
            .collect(),
    })
}
