//! A short fuzzing run of every target from a fixed seed, and a replay of
//! every input that once made a target fail (`regressions/TARGET/`).
//!
//! The executions per target are chosen for about a second each in a
//! debug build; `cargo xtask fuzz` runs the long version. The tests of
//! this file run in parallel: the largest allocation seen by one target is
//! the largest of all that run meanwhile, each far below the limit.

use std::path::Path;
use std::time::Duration;

use persist_agent::sys::alloc::LargestAlloc;
use persist_fuzz::{Config, fuzz, run_one, target};

#[global_allocator]
static ALLOCATOR: LargestAlloc = LargestAlloc::new();

/// Fuzzes `name` for `executions` inputs from a fixed seed, then replays
/// its regression inputs; fails with every finding.
fn short_run(name: &str, executions: u64) {
    let target = target(name).expect("a known target");
    let config = Config {
        seed: 0x5eed,
        time: None,
        executions: Some(executions),
        input_timeout: Duration::from_secs(20),
        allocator: Some(&ALLOCATOR),
        ..Config::default()
    };
    let report = fuzz(target, &config);
    assert_eq!(report.executions, executions, "the run went its length");
    let findings: Vec<String> = report
        .findings
        .iter()
        .map(|finding| {
            format!(
                "{}: {} on input {:?}",
                finding.kind,
                finding.message,
                String::from_utf8_lossy(&finding.input)
            )
        })
        .collect();
    assert!(
        findings.is_empty(),
        "{name} failed:\n{}",
        findings.join("\n")
    );

    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("listing the regression inputs").path();
        let input = std::fs::read(&path).expect("reading a regression input");
        if let Some(panic) = run_one(target, &input) {
            panic!("{} fails {name} again: {panic}", path.display());
        }
    }
}

#[test]
fn manifest() {
    short_run("manifest", 2000);
}

#[test]
fn image() {
    short_run("image", 300);
}

#[test]
fn page_store() {
    short_run("page-store", 400);
}

#[test]
fn working_set() {
    short_run("working-set", 300);
}

#[test]
fn service() {
    short_run("service", 2000);
}

#[test]
fn service_toml() {
    short_run("service-toml", 2000);
}

#[test]
fn control() {
    short_run("control", 10_000);
}

#[test]
fn a_panicking_input_is_found_reduced_and_replayed() {
    // The engine itself, on a target with a planted bug.
    static PLANTED: persist_fuzz::Target = persist_fuzz::Target {
        name: "planted",
        about: "panics on any input holding the byte 0xff",
        run: |data| assert!(!data.contains(&0xff), "planted bug"),
        seeds: || vec![b"seed input with no such byte".to_vec()],
    };
    let config = Config {
        seed: 1,
        time: None,
        executions: Some(5000),
        ..Config::default()
    };
    let report = fuzz(&PLANTED, &config);
    assert_eq!(report.findings.len(), 1, "one bug, one finding: {report:?}");
    let finding = &report.findings[0];
    assert!(
        finding.message.contains("planted bug"),
        "{}",
        finding.message
    );
    assert_eq!(
        finding.input,
        [0xff],
        "the input is reduced to the byte that matters"
    );
    assert!(run_one(&PLANTED, &finding.input).is_some(), "it replays");
}
