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
    /// Kill the daemon at random instants of redis park/wake cycles and
    /// check that nothing is lost (needs root).
    CrashTest {
        /// Park/wake cycles, each with one daemon SIGKILL.
        #[arg(long, default_value_t = 200)]
        cycles: u32,
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
        Task::CrashTest { cycles } => crash_test(cycles),
        Task::Bench { quick, runs } => bench::run(quick, runs),
    }
}

/// Runs the crash test of `tests/tests/daemon_crash.rs` with `cycles` cycles.
fn crash_test(cycles: u32) -> Result<()> {
    deps::require_root()?;
    deps::ensure(deps::TEST)?;
    deps::cargo(&["build", "--workspace", "--bins"])?;
    let cycles = cycles.to_string();
    deps::cargo_with_env(
        &[("PERSIST_CRASH_CYCLES", &cycles)],
        &[
            "test",
            "-p",
            "persist-tests",
            "--test",
            "daemon_crash",
            "--",
            "--ignored",
            "--nocapture",
            "redis_loses_nothing",
        ],
    )
}

fn test(args: &[String]) -> Result<()> {
    deps::require_root()?;
    deps::ensure(deps::TEST)?;
    deps::cargo(&["build", "--workspace", "--bins"])?;
    let mut test_args = vec!["test", "--workspace"];
    test_args.extend(args.iter().map(String::as_str));
    deps::cargo(&test_args)
}
