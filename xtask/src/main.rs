//! `cargo xtask`: installs what persist needs, and runs its demo, tests and benchmarks.

mod bench;
mod deb;
mod demo;
mod deps;
mod privilege;

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
    /// Build the Debian package of the agent into target/debian/ (no root needed).
    Deb {
        /// Package the dev build instead of a release build (as the tests do).
        #[arg(long)]
        debug: bool,
    },
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
        /// Copy the plot to docs/bench-latency.svg, the one the README shows.
        #[arg(long)]
        update_docs: bool,
        /// Instead: park N hello-servers (8 adds in flight) and measure what
        /// they cost the host and its disk, the agent's size, the rate of
        /// connections to an unregistered port with and without the agent,
        /// wakes one at a time and a wake storm of one request to each: with
        /// every skeleton prepared, then with the daemon restarted under
        /// `--skeleton-budget 0` (images only, cold wakes).
        #[arg(long, value_name = "N")]
        scale: Option<usize>,
        /// Only the servers whose service name starts with this (`nginx`:
        /// both nginx rows).
        #[arg(long, value_name = "NAME")]
        only: Option<String>,
        /// With --scale: add the services with `--share-pages`, their images
        /// sharing the pages they have in common.
        #[arg(long, requires = "scale")]
        share_pages: bool,
        /// With --scale: K of the N services are python's http.server
        /// (spread among the hello-servers), and its cold wake is set beside
        /// its fresh start.
        #[arg(long, value_name = "K", requires = "scale")]
        mix_python: Option<usize>,
        /// With --scale: the image-only tier alone, the daemon under
        /// `--skeleton-budget 0` from the start (a host whose open-files
        /// limit holds the services' listeners but not their skeletons'
        /// descriptors); the storm asks at most 1,000 of them.
        #[arg(long, requires = "scale")]
        images_only: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Deps => deps::ensure(deps::TEST),
        Task::Deb { debug } => {
            let deb = deb::build(debug)?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Demo => demo::run(),
        Task::Test { args } => test(&args),
        Task::CrashTest { cycles } => crash_test(cycles),
        Task::Fuzz { target, time, seed } => fuzz(target.as_deref(), &time, seed),
        Task::Bench {
            quick,
            runs,
            update_docs,
            scale,
            only,
            share_pages,
            mix_python,
            images_only,
        } => bench::run(
            quick,
            runs,
            update_docs,
            scale.map(|services| bench::ScaleOptions {
                services,
                python: mix_python.unwrap_or(0),
                share_pages,
                images_only,
            }),
            only.as_deref(),
        ),
    }
}

/// Runs the crash test of `tests/tests/daemon_crash.rs` with `cycles` cycles.
fn crash_test(cycles: u32) -> Result<()> {
    deps::ensure(deps::TEST)?;
    deps::cargo(&["build", "--workspace", "--bins"])?;
    let cycles = cycles.to_string();
    let runner = privilege::cargo_test_runner()?;
    let mut args = vec!["test", "-p", "persist-tests", "--test", "daemon_crash"];
    args.extend(runner.iter().map(String::as_str));
    args.extend(["--", "--nocapture", "redis_loses_nothing"]);
    deps::cargo_with_env(&[("PERSIST_CRASH_CYCLES", &cycles)], &args)
}

fn test(args: &[String]) -> Result<()> {
    deps::ensure(deps::TEST)?;
    deps::cargo(&["build", "--workspace", "--bins"])?;
    // The engine builds alone, without the daemon's dependencies.
    deps::cargo(&[
        "build",
        "-p",
        "persist-agent",
        "--no-default-features",
        "--examples",
    ])?;
    // tests/tests/package.rs installs it.
    let deb = deb::build(true)?;
    // Built as whoever runs this; only the test binaries run as root.
    let runner = privilege::cargo_test_runner()?;
    let mut test_args = vec!["test", "--workspace"];
    test_args.extend(runner.iter().map(String::as_str));
    test_args.extend(args.iter().map(String::as_str));
    deps::cargo_with_env(&[("PERSIST_DEB", &deb.to_string_lossy())], &test_args)
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
