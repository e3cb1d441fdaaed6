//! The `sigil-bench` harness: scenarios that start real `sigil-server`
//! and `sigil-agent` processes, drive them over their real APIs, and
//! measure, in the same run, the raw limit each result is compared with.
//!
//! # Layout
//! - [`cluster`]: a server in a temporary directory, real agents next to
//!   it, simulated agents speaking the node API, admin and Workload API
//!   clients.
//! - [`raw`]: the raw limits (ring ECDSA loops, a bare tonic stream over a
//!   Unix socket in this process).
//! - [`issuance`], [`jwt`], [`workload`], [`revocation`], [`rotation`],
//!   [`scale`], [`taint`]: one scenario each.
//! - [`ha`]: the PostgreSQL scenarios (`--datastore postgres`): writes
//!   (sled next to PostgreSQL), propagation across two replicas, failover.
//!
//! Every scenario returns a [`Report`]: named metrics, each with the target
//! it is held to (if any). Nothing here asserts on timing; the binary
//! prints what was measured and whether each target was met.

pub mod cluster;
pub mod ha;
pub mod issuance;
pub mod jwt;
pub mod raw;
pub mod revocation;
pub mod rotation;
pub mod scale;
pub mod taint;
pub mod workload;

use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};

/// The scenarios, in the order they run.
pub const SCENARIOS: &[&str] = &[
    "issuance",
    "jwt",
    "workload-latency",
    "revocation",
    "rotation",
    "scale",
    "taint",
];

/// The scenarios on PostgreSQL (`--datastore postgres`), in the order
/// they run; the default scenarios of such a run.
pub const POSTGRES_SCENARIOS: &[&str] = &["writes", "ha-propagation", "failover"];

/// How a scenario runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Scaled down, for the CI smoke run.
    pub quick: bool,
    /// With `--datastore postgres`: a connection string to a PostgreSQL
    /// server where each scenario creates a fresh database.
    pub postgres: Option<String>,
    /// `--agents`: simulated agents of the scale scenario (instead of its
    /// default).
    pub agents: Option<usize>,
    /// `--entries`: total entries of the scale scenario, spread evenly
    /// over its agents (instead of its default).
    pub entries: Option<usize>,
}

impl Options {
    /// `full` in a full run, `quick` in a quick one.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

/// A bound a metric is held to.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Target::AtLeast(b) => value >= b,
            Target::AtMost(b) => value <= b,
        }
    }

    fn describe(self) -> String {
        match self {
            Target::AtLeast(b) => format!(">= {}", number(b)),
            Target::AtMost(b) => format!("<= {}", number(b)),
        }
    }
}

/// One measured value.
#[derive(Debug, Clone)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub target: Option<Target>,
}

/// What one scenario measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: String,
    /// The scenario's size parameters.
    pub params: Value,
    pub metrics: Vec<Metric>,
    /// Wall time of the whole scenario, setup included.
    pub wall: Duration,
}

impl Report {
    /// An empty report for `scenario` with `params`.
    pub fn new(scenario: &str, params: Value) -> Self {
        Self {
            scenario: scenario.to_owned(),
            params,
            metrics: Vec::new(),
            wall: Duration::ZERO,
        }
    }

    /// Adds a metric without a target.
    pub fn add(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        self.metrics.push(Metric {
            name: name.into(),
            value,
            unit,
            target: None,
        });
    }

    /// Adds a metric held to `target`.
    pub fn add_target(
        &mut self,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        target: Target,
    ) {
        self.metrics.push(Metric {
            name: name.into(),
            value,
            unit,
            target: Some(target),
        });
    }

    /// Adds count, p50, p99 and max of `summary` (milliseconds), holding
    /// p99 to `p99_target` if given.
    pub fn add_latency(&mut self, prefix: &str, summary: &Summary, p99_target: Option<f64>) {
        self.add(format!("{prefix} count"), summary.count as f64, "");
        self.add(format!("{prefix} p50"), summary.p50, "ms");
        match p99_target {
            Some(t) => self.add_target(
                format!("{prefix} p99"),
                summary.p99,
                "ms",
                Target::AtMost(t),
            ),
            None => self.add(format!("{prefix} p99"), summary.p99, "ms"),
        }
        self.add(format!("{prefix} max"), summary.max, "ms");
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        let metrics: Vec<Value> = self
            .metrics
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "value": m.value,
                    "unit": m.unit,
                    "target": m.target.map(Target::describe),
                    "met": m.target.map(|t| t.met(m.value)),
                })
            })
            .collect();
        json!({
            "scenario": self.scenario,
            "params": self.params,
            "wall_seconds": self.wall.as_secs_f64(),
            "metrics": metrics,
        })
    }
}

/// Runs the scenario called `name`.
pub async fn run(name: &str, options: &Options) -> Result<Report> {
    let started = std::time::Instant::now();
    let mut report = match name {
        "issuance" => issuance::run(options).await?,
        "jwt" => jwt::run(options).await?,
        "workload-latency" => workload::run(options).await?,
        "revocation" => revocation::run(options).await?,
        "rotation" => rotation::run(options).await?,
        "scale" => scale::run(options).await?,
        "taint" => taint::run(options).await?,
        "writes" => ha::writes(options).await?,
        "ha-propagation" => ha::propagation(options).await?,
        "failover" => ha::failover(options).await?,
        other => bail!(
            "unknown scenario {other:?}; the scenarios are {}, and with --datastore postgres {}",
            SCENARIOS.join(", "),
            POSTGRES_SCENARIOS.join(", ")
        ),
    };
    report.wall = started.elapsed();
    Ok(report)
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Count, p50, p99 (nearest rank) and max of `samples`, in milliseconds.
pub fn summarize(samples: &[Duration]) -> Summary {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let rank = |p: f64| -> f64 {
        if ms.is_empty() {
            return f64::NAN;
        }
        let i = ((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
        ms[i]
    };
    Summary {
        count: ms.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        max: ms.last().copied().unwrap_or(f64::NAN),
    }
}

/// VmRSS and VmHWM of process `pid`, in bytes.
pub fn memory(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?;
    let field = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow::anyhow!("{path} has no {name} line"))?;
        let kib: u64 = line
            .trim_start_matches(name)
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{path}: bad {name} line {line:?}: {e}"))?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Raises this process's open-file limit to at least `want` (soft and,
/// when needed and allowed, hard); child processes (the server) inherit
/// it. Returns the soft limit now in force.
pub fn raise_fd_limit(want: u64) -> Result<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let soft = now.current.unwrap_or(u64::MAX);
    if soft >= want {
        return Ok(soft);
    }
    let hard = now.maximum.unwrap_or(u64::MAX);
    let limit = Rlimit {
        current: Some(want),
        maximum: Some(hard.max(want)),
    };
    if let Err(e) = setrlimit(Resource::Nofile, limit) {
        // Without the privilege to raise the hard limit, go as far as it.
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        )
        .map_err(|e2| anyhow::anyhow!("cannot raise the open-file limit: {e2}"))?;
        if hard < want {
            bail!(
                "the open-file limit is {hard} and raising it to {want} failed ({e}); \
                 run as root or raise `ulimit -Hn` first"
            );
        }
        return Ok(hard);
    }
    Ok(want)
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; here 12 and 13 (0-based
    // 11 and 12) after the state field.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("{path}: no field {i}"))
    };
    let total = ticks(11)? + ticks(12)?;
    // /proc reports in USER_HZ, which Linux fixes at 100 for user space.
    Ok(Duration::from_millis(total * 10))
}

/// A progress line on stderr.
pub fn progress(scenario: &str, what: impl std::fmt::Display) {
    eprintln!("[{scenario}] {what}");
}

/// A number for a table: integers without decimals, small values with a few.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a >= 1000.0 || (a.fract() == 0.0 && a < 1e15) {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The reports as a text table.
pub fn table(reports: &[Report]) -> String {
    let mut rows: Vec<[String; 5]> = vec![[
        "scenario".into(),
        "metric".into(),
        "value".into(),
        "target".into(),
        "met".into(),
    ]];
    for r in reports {
        for m in &r.metrics {
            let value = if m.unit.is_empty() {
                number(m.value)
            } else {
                format!("{} {}", number(m.value), m.unit)
            };
            rows.push([
                r.scenario.clone(),
                m.name.clone(),
                value,
                m.target.map(Target::describe).unwrap_or_default(),
                match m.target {
                    Some(t) if t.met(m.value) => "yes".into(),
                    Some(_) => "NO".into(),
                    None => String::new(),
                },
            ]);
        }
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = summarize(&samples);
        assert_eq!(s.count, 100);
        assert!((s.p50 - 50.0).abs() < 1e-9);
        assert!((s.p99 - 99.0).abs() < 1e-9);
        assert!((s.max - 100.0).abs() < 1e-9);
        assert!(summarize(&[]).p99.is_nan());
    }
}
