//! Smoke test of the benchmark harness: `sigil-bench --quick` against the
//! binaries of this build runs every scenario and produces sane results.
//! No timing assertions: CI machines vary too much for that.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn quick_run_completes_every_scenario_with_finite_results() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let bin_dir = sigil_tests::process::bin_dir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sigil-bench"))
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sigil-bench failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("scenario"), "no table printed:\n{stdout}");

    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["quick"], true);
    assert_eq!(v["failures"].as_array().unwrap().len(), 0, "{v}");
    let scenarios = v["scenarios"].as_array().unwrap();
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(names, sigil_tests::bench::SCENARIOS, "every scenario ran");
    for s in scenarios {
        let metrics = s["metrics"].as_array().unwrap();
        assert!(!metrics.is_empty(), "{s}");
        for m in metrics {
            let value = m["value"]
                .as_f64()
                .unwrap_or_else(|| panic!("not a finite number: {m}"));
            assert!(value.is_finite() && value >= 0.0, "{m}");
            let name = m["name"].as_str().unwrap();
            if name.contains("count")
                || name.contains("issued")
                || name.contains("minted")
                || name.contains("ended")
                || name.contains("rate")
            {
                assert!(value > 0.0, "{} {name} is zero", s["scenario"]);
            }
        }
    }
}

#[test]
fn quick_postgres_run_completes_every_postgres_scenario() {
    if sigil_tests::postgres::connection().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_sigil-bench"))
        .args(["--quick", "--datastore", "postgres", "--json"])
        .arg(&json)
        .arg("--bin-dir")
        .arg(sigil_tests::process::bin_dir().unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sigil-bench failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["failures"].as_array().unwrap().len(), 0, "{v}");
    let scenarios = v["scenarios"].as_array().unwrap();
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(names, sigil_tests::bench::POSTGRES_SCENARIOS);
    for s in scenarios {
        for m in s["metrics"].as_array().unwrap() {
            let value = m["value"].as_f64().unwrap();
            assert!(value.is_finite() && value > 0.0, "{m}");
        }
    }
}
