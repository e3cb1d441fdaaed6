//! The Sigil CA server.
//!
//! It holds the trust domain's CA keys, rotates them, issues X.509 and JWT
//! SVIDs, and keeps registration entries, agents, join tokens, bundles and
//! the audit log in a [`datastore::Datastore`].
//!
//! # Layout
//! - [`ca`]: CA keys and certificates, CSR handling, SVID issuance, rotation.
//! - [`datastore`]: the storage trait, the sled implementation and the
//!   conformance suite every implementation passes.

#![forbid(unsafe_code)]

pub mod ca;
pub mod datastore;
pub mod registry;
