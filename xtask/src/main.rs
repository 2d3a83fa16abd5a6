//! `cargo xtask`: installs what persist needs, and runs its demo, tests and benchmarks.

mod bench;
mod demo;
mod deps;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Developer tasks for persist.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the Debian packages that building and testing need.
    Deps,
    /// Park a bundled server, wake it with a connection, show what happened.
    Demo,
    /// Run the whole test suite against the real kernel (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the parsers of untrusted input (all targets, or one), on stable Rust.
    Fuzz {
        /// The target: manifest, image, page-store, working-set, service or control.
        target: Option<String>,
        /// How long to fuzz each target.
        #[arg(long, default_value = "60s")]
        time: String,
        /// Seed of the random generator, to replay a run (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Measure wake latencies and time-to-first-byte (needs root).
    Bench {
        /// Fewer samples, for a quick look (about a minute).
        #[arg(long)]
        quick: bool,
        /// Timed runs per server and mode (default: 150, or 40 with --quick).
        #[arg(long)]
        runs: Option<usize>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Deps => deps::ensure(deps::TEST),
        Task::Demo => demo::run(),
        Task::Test { args } => test(&args),
        Task::Fuzz { target, time, seed } => fuzz(target.as_deref(), &time, seed),
        Task::Bench { quick, runs } => bench::run(quick, runs),
    }
}

fn test(args: &[String]) -> Result<()> {
    deps::require_root()?;
    deps::ensure(deps::TEST)?;
    deps::cargo(&["build", "--workspace", "--bins"])?;
    let mut test_args = vec!["test", "--workspace"];
    test_args.extend(args.iter().map(String::as_str));
    deps::cargo(&test_args)
}

/// Builds the fuzzer with the `fuzz` profile (optimised, overflow checks on)
/// and runs it; failing inputs are saved under `target/fuzz-findings/`.
fn fuzz(target: Option<&str>, time: &str, seed: Option<u64>) -> Result<()> {
    let out = deps::workspace_root().join("target/fuzz-findings");
    let out = out.to_string_lossy();
    let seed = seed.map(|seed| seed.to_string());
    let mut args = vec![
        "run",
        "--profile",
        "fuzz",
        "-p",
        "persist-fuzz",
        "--",
        "run",
    ];
    args.extend(target);
    args.extend(["--time", time, "--out", &out]);
    if let Some(seed) = &seed {
        args.extend(["--seed", seed]);
    }
    deps::cargo(&args)
}
