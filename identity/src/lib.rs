//! SPIFFE domain types and the pure logic Sigil builds on.
//!
//! Everything here is free of async runtimes and wire formats: types that
//! are valid by construction (IDs, selectors, entries, bundles), the
//! X509-SVID profile validator, JWT-SVID minting and validation, and
//! rotation timing as pure functions of `now`.
//!
//! # Layout
//! - [`spiffe_id`]: `SpiffeId` and `TrustDomain`, every SPIFFE-ID rule.
//! - [`selector`]: `type:value` selectors and subset matching.
//! - [`entry`]: registration entries, entry ids, DNS names.
//! - [`keys`]: the public key types Sigil accepts and signature checks.
//! - [`bundle`]: trust bundles and their SPIFFE JWK Set encoding.
//! - [`x509`]: the X509-SVID profile and chain verification.
//! - [`csr`]: the PKCS#10 reader that takes a CSR's verified public key.
//! - [`jws`]: the one compact-JWS verifier (header rules, duplicate
//!   members, algorithms, signature, time claims) under JWT-SVIDs and
//!   Kubernetes tokens.
//! - [`jwks`]: the one JWK Set reader (bundles and OIDC issuer key sets).
//! - [`jwt`]: JWT-SVID minting (cached ring signer) and validation.
//! - [`rotation`]: SVID renewal and CA rotation schedules.
//! - [`tls`]: rustls verifiers and resolvers for SPIFFE mTLS.
//! - [`crl`]: revocation lists checked by those verifiers (signed by a
//!   bundle authority; a CA without one is allowed).
//! - [`clock`]: the `Clock` trait, a fake clock, time serde helpers.
//! - [`duration`]: human-readable durations (`90s`, `1h30m`).
//! - [`attestation`]: node attestor plugin traits (server and agent halves).
//! - [`der`], [`pem`], [`random`]: minimal DER, PEM and randomness helpers.
//! - [`secret_file`]: crash-safe writes of keys to disk (0600), the SVID
//!   files the CLIs write.
//! - [`rate_limit`]: per-key token buckets (server and agent limits).

#![forbid(unsafe_code)]

pub mod attestation;
pub mod bundle;
pub mod clock;
pub mod crl;
pub mod csr;
pub mod der;
pub mod duration;
pub mod entry;
pub mod jwks;
pub mod jws;
pub mod jwt;
pub mod keys;
pub mod pem;
pub mod random;
pub mod rate_limit;
pub mod rotation;
pub mod secret_file;
pub mod selector;
pub mod spiffe_id;
pub mod tls;
pub mod x509;

#[cfg(test)]
mod testutil;

pub use bundle::{Bundle, JwtAuthority};
pub use entry::{AdminRole, DnsName, EntryId, RegistrationEntry};
pub use selector::{Selector, SelectorSet};
pub use spiffe_id::{AgentId, SpiffeId, TrustDomain};
