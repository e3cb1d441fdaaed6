//! The Sigil CA server.
//!
//! It holds the trust domain's CA keys, rotates them, issues X.509 and JWT
//! SVIDs, and keeps registration entries, agents, join tokens, bundles and
//! the audit log in a [`datastore::Datastore`].
//!
//! # Layout
//! - [`ca`]: CA keys (disk, memory, PKCS#11 token) and certificates, CSR
//!   handling, SVID issuance, rotation.
//! - [`datastore`]: the storage trait with its change feed, the sled
//!   implementation, the PostgreSQL one shared by server replicas
//!   ([`datastore::postgres`]), and the conformance suite every
//!   implementation passes.
//! - [`registry`]: in-memory authorization index, built from the datastore's
//!   change feed (the process's one feed loop), and change fan-out to Sync
//!   streams and feed listeners (the CA's bundle); its change history is
//!   saved when the server stops so agents resume after a restart
//!   ([`registry::history`]).
//! - [`agents`]: the agent lifecycle (attest, authenticate, renew, ban,
//!   evict), one service the node and admin APIs call.
//! - [`node_api`]: the agent-facing gRPC API over TLS 1.3.
//! - [`admin_api`]: the operator-facing gRPC API on a Unix socket, and
//!   over mTLS for admin SVIDs ([`admin_api::mtls`]).
//! - [`admin_client`]: connecting to it on the Unix socket (the CLI,
//!   quickstart, tests).
//! - [`remote_admin`]: the client side of the admin API over mTLS.
//! - [`audit`]: the audit trail (token buckets are `sigil_identity::rate_limit`).
//! - [`retention`]: pruning of old changes, audit records and agents.
//! - [`revocation`]: `x509 revoke`, issuance records, and each CA's CRL
//!   kept signed and pushed to agents.
//! - [`config`]: TOML config merged with flags.
//! - [`catalog`]: the parts built from config (server id, datastore, CA key manager,
//!   upstream CA, node attestors).
//! - [`server`]: wiring and `run(config, listeners, shutdown)`.
//! - [`server_id`]: the stable id of this replica (`ServerId`).
//! - [`shutdown`]: the stop signals, the wait tasks end with, the grace
//!   period for open connections.
//! - [`status`]: errors as gRPC statuses, one mapping for both APIs.
//! - [`telemetry`]: metrics and readiness for the `[telemetry]` listener.
//! - [`registration_file`], [`entry_apply`]: registration entries kept as
//!   code (`entry plan`/`apply`/`export`).
//! - [`oidc_discovery`]: the `[oidc_discovery]` HTTPS listener serving the
//!   OpenID discovery document and the JWT keys for relying parties.
//! - [`federation`]: SPIFFE federation: the bundle endpoint, polling of
//!   foreign bundle endpoints, and the federated bundles agents are given.

#![forbid(unsafe_code)]

pub mod admin_api;
pub mod admin_client;
pub mod agents;
pub mod audit;
pub mod ca;
pub mod catalog;
pub mod config;
pub mod datastore;
pub mod entry_apply;
pub mod federation;
pub mod node_api;
pub mod oidc_discovery;
pub mod registration_file;
pub mod registry;
pub mod remote_admin;
pub mod retention;
pub mod revocation;
pub mod server;
pub mod server_id;
pub mod shutdown;
pub mod status;
pub mod telemetry;
