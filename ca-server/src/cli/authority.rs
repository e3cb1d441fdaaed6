//! `sigil-server authority {x509|jwt} show|prepare|activate|taint|revoke`:
//! the CA authority commands for incident response (see the README's
//! "Incident response").

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use sigil_proto::admin as pb;
use sigil_proto::channel::RpcError;
use sigil_proto::output::Output;

use super::{AdminTarget, connect, expiry};

/// The two kinds of authority.
#[derive(Debug, Subcommand)]
pub enum AuthorityCmd {
    /// X.509 CA authorities, named by the CA certificate's
    /// SubjectKeyIdentifier (hex; `show` lists them).
    #[command(subcommand)]
    X509(AuthorityStep),
    /// JWT authorities, named by their `kid`.
    #[command(subcommand)]
    Jwt(AuthorityStep),
}

/// The steps, in the order of the incident runbook:
/// show → prepare → (wait for agents) → activate → taint → revoke.
#[derive(Debug, Subcommand)]
pub enum AuthorityStep {
    /// List every replica's authorities: prepared, active, old, tainted, revoked.
    Show,
    /// Make a new authority and publish it in the bundle; it does not sign
    /// until activated. Refused while one is prepared or a tainted one is
    /// not yet revoked.
    Prepare(Replica),
    /// Make the prepared authority the active one (the active one becomes old).
    /// Wait until agents have the new bundle (one Sync push, normally
    /// seconds) before activating.
    Activate(Step),
    /// Mark an old authority tainted: it stays trusted, and every agent
    /// replaces each SVID it signed (and drops cached JWT-SVIDs of a tainted kid).
    Taint(Step),
    /// Remove a tainted authority from the bundle: whatever it signed is
    /// no longer trusted anywhere.
    Revoke(Step),
}

/// Which replica's authority (CA keys are per replica).
#[derive(Debug, Args)]
pub struct Replica {
    /// The replica whose authority it is [default: the one connected to].
    /// Only that replica holds its keys, so the command must reach it.
    #[arg(long, value_name = "ID")]
    pub server_id: Option<String>,
}

/// An authority of a replica.
#[derive(Debug, Args)]
pub struct Step {
    /// The authority: SubjectKeyIdentifier (hex, colons allowed) for x509,
    /// kid for jwt.
    #[arg(long, value_name = "ID")]
    pub id: String,
    #[command(flatten)]
    pub replica: Replica,
}

fn authority_json(a: &pb::Authority) -> Value {
    json!({
        "kind": kind_name(a.kind),
        "id": a.id,
        "state": a.state,
        "not_before": a.not_before,
        "not_after": a.not_after,
        "server_id": a.server_id,
    })
}

fn kind_name(k: i32) -> &'static str {
    match pb::AuthorityKind::try_from(k) {
        Ok(pb::AuthorityKind::Jwt) => "jwt",
        _ => "x509",
    }
}

/// Runs one authority command.
pub async fn run(cmd: AuthorityCmd, target: &AdminTarget, output: Output) -> Result<()> {
    let (kind, step) = match cmd {
        AuthorityCmd::X509(s) => (pb::AuthorityKind::X509, s),
        AuthorityCmd::Jwt(s) => (pb::AuthorityKind::Jwt, s),
    };
    let mut c = connect(target).await?;
    let request = |id: String, replica: Replica| pb::AuthorityRequest {
        kind: kind as i32,
        id,
        server_id: replica.server_id.unwrap_or_default(),
    };
    let (verb, reply) = match step {
        AuthorityStep::Show => {
            let r = c
                .authority_show(pb::AuthorityShowRequest { kind: kind as i32 })
                .await
                .map_err(RpcError)?
                .into_inner();
            if output.is_json() {
                output.print(
                    &json!({
                        "server_id": r.server_id,
                        "authorities": r.authorities.iter().map(authority_json).collect::<Vec<_>>(),
                    }),
                    "",
                );
            } else if r.authorities.is_empty() {
                println!("no authorities");
            } else {
                println!("{:<20} {:<8} {:<66} EXPIRES", "REPLICA", "STATE", "ID");
                for a in &r.authorities {
                    let here = if a.server_id == r.server_id { " *" } else { "" };
                    println!(
                        "{:<20} {:<8} {:<66} {}",
                        format!("{}{here}", a.server_id),
                        a.state,
                        a.id,
                        expiry(a.not_after)
                    );
                }
                println!("(* = the replica you are connected to)");
            }
            return Ok(());
        }
        AuthorityStep::Prepare(replica) => (
            "prepared",
            c.authority_prepare(request(String::new(), replica)).await,
        ),
        AuthorityStep::Activate(s) => (
            "activated",
            c.authority_activate(request(s.id, s.replica)).await,
        ),
        AuthorityStep::Taint(s) => ("tainted", c.authority_taint(request(s.id, s.replica)).await),
        AuthorityStep::Revoke(s) => (
            "revoked",
            c.authority_revoke(request(s.id, s.replica)).await,
        ),
    };
    let a = reply
        .map_err(RpcError)?
        .into_inner()
        .authority
        .unwrap_or_default();
    output.print(
        &authority_json(&a),
        format!(
            "{verb} {} authority {} on replica {} (now {}, expires {})\n",
            kind_name(a.kind),
            a.id,
            a.server_id,
            a.state,
            expiry(a.not_after)
        ),
    );
    Ok(())
}
