//! `sigil-bench`: starts real `sigil-server` and `sigil-agent` processes,
//! drives them through each benchmark scenario, prints a table of the
//! results (stdout) and writes them as JSON. Progress goes to stderr.
//!
//! `sigil-bench --quick` runs every scenario scaled down (the CI smoke run);
//! use release binaries for real numbers:
//! `sigil-bench --bin-dir target/release`. `sigil-bench --datastore
//! postgres` runs the PostgreSQL scenarios (writes, ha-propagation,
//! failover) on the server named by `SIGIL_POSTGRES`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sigil_tests::bench::{self, Options, POSTGRES_SCENARIOS, SCENARIOS};

/// Benchmark harness for Sigil.
#[derive(Debug, Parser)]
#[command(name = "sigil-bench", version)]
struct Cli {
    /// Run every scenario scaled down (under 2 minutes; no numbers to quote).
    #[arg(long)]
    quick: bool,
    /// Run only this scenario (repeatable): issuance, jwt, taint,
    /// workload-latency, revocation, rotation, scale; with `--datastore
    /// postgres` also writes, ha-propagation, failover.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// `postgres`: run the PostgreSQL scenarios (by default all of them)
    /// on the server of the libpq connection string in `SIGIL_POSTGRES`,
    /// creating a fresh database for each.
    #[arg(long, value_name = "sled|postgres", default_value = "sled")]
    datastore: String,
    /// Where to write the results as JSON.
    #[arg(long, value_name = "FILE", default_value = "target/sigil-bench.json")]
    json: PathBuf,
    /// Directory holding sigil-server and sigil-agent [default: next to
    /// this executable, or $SIGIL_BIN_DIR].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Start servers and agents with their telemetry listener on (metrics
    /// recorded), to compare with a run without it.
    #[arg(long)]
    telemetry: bool,
    /// Simulated agents of the scale scenario, each with its own mTLS
    /// connection and Sync stream [default: 1000; 50 with --quick]. Many
    /// thousands need a high open-file limit (raised here when allowed,
    /// e.g. as root) and several loopback source addresses (used
    /// automatically).
    #[arg(long, value_name = "N")]
    agents: Option<usize>,
    /// Total entries of the scale scenario, spread evenly over its agents
    /// [default: 100 per agent; 40 with --quick].
    #[arg(long, value_name = "N")]
    entries: Option<usize>,
    /// Internal: run as the probe workload of the rotation scenario.
    #[arg(long, hide = true, value_name = "SOCKET")]
    probe_socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sigil-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(socket) = &cli.probe_socket {
        return runtime.block_on(bench::rotation::probe(socket));
    }
    if let Some(dir) = &cli.bin_dir {
        let dir =
            std::path::absolute(dir).with_context(|| format!("bad --bin-dir {}", dir.display()))?;
        sigil_tests::process::set_bin_dir(dir)?;
    }
    let postgres = match cli.datastore.as_str() {
        "sled" => None,
        "postgres" => Some(std::env::var("SIGIL_POSTGRES").context(
            "--datastore postgres needs SIGIL_POSTGRES: a libpq connection string to a \
             PostgreSQL server where the benchmark may CREATE DATABASE",
        )?),
        other => bail!("unknown --datastore {other:?}: sled or postgres"),
    };
    let defaults = if postgres.is_some() {
        POSTGRES_SCENARIOS
    } else {
        SCENARIOS
    };
    let names: Vec<String> = if cli.scenarios.is_empty() {
        defaults.iter().map(|s| (*s).to_owned()).collect()
    } else {
        cli.scenarios.clone()
    };
    for name in &names {
        if POSTGRES_SCENARIOS.contains(&name.as_str()) && postgres.is_none() {
            bail!("scenario {name:?} runs on PostgreSQL: add --datastore postgres");
        }
        if !SCENARIOS.contains(&name.as_str()) && !POSTGRES_SCENARIOS.contains(&name.as_str()) {
            bail!(
                "unknown scenario {name:?}; the scenarios are {}, and with --datastore postgres {}",
                SCENARIOS.join(", "),
                POSTGRES_SCENARIOS.join(", ")
            );
        }
    }
    let options = Options {
        quick: cli.quick,
        postgres,
        agents: cli.agents,
        entries: cli.entries,
    };
    if options.agents == Some(0) {
        bail!("--agents must be at least 1");
    }
    sigil_tests::bench::cluster::set_telemetry(cli.telemetry);
    if cli.telemetry {
        eprintln!("sigil-bench: telemetry on (servers and agents serve /metrics)");
    }
    eprintln!(
        "sigil-bench: {} run of {}; binaries from {}",
        if cli.quick { "quick" } else { "full" },
        names.join(", "),
        sigil_tests::process::bin_dir()?.display()
    );
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for name in &names {
        eprintln!("[{name}] starting");
        match runtime.block_on(bench::run(name, &options)) {
            Ok(report) => {
                eprintln!("[{name}] done in {:.1} s", report.wall.as_secs_f64());
                reports.push(report);
            }
            Err(e) => {
                eprintln!("[{name}] FAILED: {e:#}");
                failures.push(format!("{name}: {e:#}"));
            }
        }
    }
    print!("{}", bench::table(&reports));
    let json = serde_json::json!({
        "quick": cli.quick,
        "cores": bench::raw::cores(),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "scenarios": reports.iter().map(bench::Report::to_json).collect::<Vec<_>>(),
        "failures": failures,
    });
    if let Some(parent) = cli.json.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&cli.json, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", cli.json.display()))?;
    eprintln!("sigil-bench: results written to {}", cli.json.display());
    if !failures.is_empty() {
        bail!(
            "{} scenario(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}
