//! `persist-fuzz`: fuzzes persist's parsers of untrusted input, or replays
//! saved inputs. `cargo xtask fuzz` builds and runs it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use persist_agent::sys::alloc::LargestAlloc;
use persist_fuzz::{Config, TARGETS, Target, fuzz, run_one, target};

#[global_allocator]
static ALLOCATOR: LargestAlloc = LargestAlloc::new();

/// Fuzz persist's parsers of untrusted input on stable Rust.
#[derive(Debug, Parser)]
#[command(name = "persist-fuzz")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fuzz one target, or each in turn.
    Run {
        /// The target (all of them when left out).
        target: Option<String>,
        /// How long to fuzz each target.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        time: Duration,
        /// Stop each target after this many executions, if sooner.
        #[arg(long)]
        executions: Option<u64>,
        /// Seed of the random generator (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
        /// An input running longer than this is a hang.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Where failing inputs are saved, as TARGET/KIND-N.
        #[arg(long, default_value = "fuzz-findings")]
        out: PathBuf,
    },
    /// Run a target once on each given file, reporting the ones that fail.
    Replay {
        /// The target.
        target: String,
        /// Saved inputs.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List the targets.
    List,
}

fn main() -> Result<ExitCode> {
    // On a thread of its own: the targets' per-thread scratch directories
    // are removed when their thread ends, which the main thread never does.
    std::thread::spawn(|| run_cli(Cli::parse()))
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn run_cli(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            target: name,
            time,
            executions,
            seed,
            timeout,
            out,
        } => {
            let targets: Vec<&'static Target> = match name {
                Some(name) => vec![known(&name)?],
                None => TARGETS.iter().collect(),
            };
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_nanos() as u64)
            });
            let config = Config {
                seed,
                time: Some(time),
                executions,
                input_timeout: timeout,
                allocator: Some(&ALLOCATOR),
                ..Config::default()
            };
            println!("seed {seed}");
            let mut failed = false;
            for target in targets {
                failed |= run(target, &config, &out)?;
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Replay {
            target: name,
            files,
        } => {
            let target = known(&name)?;
            let mut failed = false;
            for file in files {
                let input =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                match run_one(target, &input) {
                    Some(panic) => {
                        failed = true;
                        println!("{}: FAILS: {panic}", file.display());
                    }
                    None => println!("{}: passes", file.display()),
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::List => {
            for target in TARGETS {
                println!("{:<12} {}", target.name, target.about);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn known(name: &str) -> Result<&'static Target> {
    match target(name) {
        Some(target) => Ok(target),
        None => {
            let names: Vec<&str> = TARGETS.iter().map(|target| target.name).collect();
            bail!(
                "no fuzz target {name:?}: the targets are {}",
                names.join(", ")
            )
        }
    }
}

/// Fuzzes `target`, prints its figures and saves its findings under `out`;
/// true when it found any.
fn run(target: &'static Target, config: &Config, out: &std::path::Path) -> Result<bool> {
    let report = fuzz(target, config);
    let seconds = report.elapsed.as_secs_f64();
    println!(
        "{:<12} {:>10} executions in {:>6.1} s ({:>7.0}/s), {} findings",
        report.target,
        report.executions,
        seconds,
        report.executions as f64 / seconds.max(1e-9),
        report.findings.len()
    );
    if report.findings.is_empty() {
        return Ok(false);
    }
    let dir = out.join(report.target);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (index, finding) in report.findings.iter().enumerate() {
        let path = dir.join(format!("{}-{index}", finding.kind));
        std::fs::write(&path, &finding.input)
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "  {}: {} ({} bytes, saved as {})",
            finding.kind,
            finding.message,
            finding.input.len(),
            path.display()
        );
    }
    Ok(true)
}
