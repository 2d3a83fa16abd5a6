//! The `persist-agent` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};

use persist_agent::control::{self, Request};
use persist_agent::service::{
    KeepSkeleton, OnIdle, Prefetch, Readiness, ServiceMode, ServiceSpec, SnapshotSpec,
};
use persist_agent::{checkpoint, daemon, inspect, restore, service_file, service_log, snapshot};

/// Park server processes on disk and wake them on their first SYN.
#[derive(Debug, Parser)]
#[command(name = "persist-agent", version)]
struct Cli {
    /// Directory holding the agent's state: services, images, control socket.
    #[arg(
        long,
        global = true,
        env = "PERSIST_STATE_DIR",
        default_value = "/var/lib/persist"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent in the foreground until SIGTERM or SIGINT.
    Daemon {
        /// Serve Prometheus metrics on this address (e.g. `127.0.0.1:9187`).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Generations of a `--on-idle keep` service's state to keep, besides
        /// its pristine image and tagged generations.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        keep_generations: u32,
        /// Directory of service files, one `NAME.toml` per service, applied
        /// at start, on SIGHUP and by `reload`.
        #[arg(long, default_value = service_file::DEFAULT_SERVICES_DIR)]
        services_dir: PathBuf,
        /// Rotate a service's log (`STATE_DIR/logs/NAME.log`, its stdout and
        /// stderr) to `NAME.log.1` once it is larger than this many bytes.
        #[arg(long, default_value_t = daemon::DEFAULT_LOG_MAX_BYTES, value_parser = clap::value_parser!(u64).range(1024..))]
        log_max_bytes: u64,
        /// Threads that prepare, resume and page every snapshot service
        /// (default: two per CPU). A parked service needs none; a wake whose
        /// pages are coming in, or a skeleton that handles SIGCONT itself,
        /// holds one more until it is done.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        restore_threads: Option<u32>,
        /// What the prepared skeletons of parked services may cost together
        /// (e.g. `64MiB`): over it, `--keep-skeleton auto` services lose
        /// theirs, least recently woken first, and wake cold. No limit by
        /// default.
        #[arg(long, value_name = "SIZE", value_parser = daemon::parse_size)]
        skeleton_budget: Option<u64>,
    },
    /// Hold the listening sockets the daemon hands over (the port keeper,
    /// which the daemon starts itself).
    #[command(hide = true, name = "keep-ports")]
    KeepPorts,
    /// Print a service's log (its stdout and stderr), the rotated part first.
    Logs {
        /// Name of the service.
        name: String,
        /// Go on printing what the service writes, until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Apply the daemon's services directory again: new files add their
    /// service, removed files remove it, changed files rebuild it.
    Reload,
    /// Check service files without a daemon, naming the file, line and key
    /// of each error.
    Check {
        /// The directory of service files, or one file.
        #[arg(default_value = service_file::DEFAULT_SERVICES_DIR)]
        path: PathBuf,
    },
    /// Register a service: the agent holds its port and starts it on the first SYN.
    Add(AddArgs),
    /// Unregister a service, stopping it if it runs.
    Remove {
        /// Name of the service.
        name: String,
    },
    /// Stop a service now and park it; the next SYN wakes it.
    Park {
        /// Name of the service.
        name: String,
    },
    /// Start a parked service now, without waiting for a SYN.
    Wake {
        /// Name of the service.
        name: String,
    },
    /// List the generations of a service's kept state (`--on-idle keep`).
    History {
        /// Name of the service.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make the next wake restore an older generation; a running process is
    /// stopped without keeping its state.
    Rollback {
        /// Name of the service.
        name: String,
        /// A generation number, or `pristine`; by default the good one
        /// before the current.
        #[arg(long, value_name = "GEN|pristine")]
        to: Option<String>,
    },
    /// Keep a running service's state as a new generation without parking
    /// it (or tag the current generation of a parked one).
    Snapshot {
        /// Name of the service.
        name: String,
        /// Name the generation: a tagged generation is never pruned.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Show every service, or the services named.
    Status {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Only these services (each must be registered).
        names: Vec<String>,
    },
    /// Start a command, snapshot it when ready, and write its image (no daemon needed).
    Build(BuildArgs),
    /// Snapshot a live process to an image directory.
    Checkpoint {
        /// The process to snapshot.
        #[arg(long)]
        pid: i32,
        /// The image directory to write.
        #[arg(long)]
        image: PathBuf,
        /// Let the process go on after the checkpoint (by default it is killed).
        #[arg(long)]
        leave_running: bool,
        /// Store only pages that differ from IMAGE; its page stores are hard-linked.
        #[arg(long, value_name = "IMAGE")]
        base: Option<PathBuf>,
        /// Keep in FILE, while the checkpoint runs, what undoes it: if this
        /// command is killed, the process stays stopped until `recover FILE`.
        #[arg(long, value_name = "FILE")]
        recovery_file: Option<PathBuf>,
        /// Save the whole tree of processes under PID with it, instead of
        /// refusing a process with children (`restore` rebuilds the tree).
        #[arg(long)]
        tree: bool,
    },
    /// Undo the checkpoint of a killed `checkpoint --recovery-file FILE`:
    /// the process runs on as if it had not begun.
    Recover {
        /// The recovery file.
        file: PathBuf,
    },
    /// Restore a process from an image, detached; prints its pid last.
    Restore {
        /// The image directory.
        #[arg(long)]
        image: PathBuf,
        /// Reopen a recorded file whose path names another file now (other
        /// inode or device), instead of refusing the restore.
        #[arg(long)]
        accept_changed_files: bool,
    },
    /// Print a readable summary of an image.
    Inspect {
        /// The image directory.
        image: PathBuf,
    },
    /// Print the shell completion script for SHELL (e.g. `persist-agent
    /// completions bash > /etc/bash_completion.d/persist-agent`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write a man page for the command and one for each subcommand into
    /// DIR (as packaging does).
    #[command(hide = true)]
    ManPages {
        /// The directory to write `persist-agent.1` and `persist-agent-*.1` into.
        dir: PathBuf,
    },
}

/// When and how a snapshot-mode command is snapshotted.
#[derive(Debug, Args)]
struct ReadyArgs {
    /// User to run the command as (default: root).
    #[arg(long)]
    user: Option<String>,
    /// When the command is ready: `tcp` (it listens on the port), `http:/PATH`
    /// (GET PATH succeeds) or `notify` (READY=1 on NOTIFY_SOCKET).
    #[arg(long, default_value = "tcp")]
    ready: Readiness,
    /// How long to wait for readiness (100ms to 1day).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// Requests sent once ready and before the snapshot, to warm caches.
    #[arg(long, default_value_t = 0)]
    warmup_requests: u32,
    /// A shell command run (`sh -c`, as `--user`) once ready and after the
    /// warm-up requests, before the snapshot: real client work whose
    /// caches every wake then starts with (e.g. `psql -c 'SELECT 1'`). The
    /// build fails unless it exits 0 within the ready timeout.
    #[arg(long, value_name = "SHELL_COMMAND")]
    warmup_command: Option<String>,
}

#[derive(Debug, Args)]
struct BuildArgs {
    /// The image directory to write.
    #[arg(long)]
    image: PathBuf,
    /// TCP port the command listens on.
    #[arg(long)]
    port: u16,
    /// Address the command listens on, IPv4 or IPv6.
    #[arg(long, default_value = "127.0.0.1")]
    addr: std::net::IpAddr,
    #[command(flatten)]
    ready: ReadyArgs,
    /// File for the command's output (it keeps writing there after restores).
    #[arg(long)]
    log: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct AddArgs {
    /// Name of the service.
    name: String,
    /// TCP port the service listens on.
    #[arg(long)]
    port: u16,
    /// Local address to listen on, IPv4 or IPv6 (`::` takes both families,
    /// as a dual-stack server does).
    #[arg(long, default_value = "127.0.0.1")]
    addr: std::net::IpAddr,
    /// Start CMD on wake with the listening socket passed as fd 3 (systemd's protocol).
    #[arg(long, conflicts_with = "inetd")]
    exec: bool,
    /// Start one CMD per connection, the connection on stdin and stdout.
    #[arg(long)]
    inetd: bool,
    /// Stop and park the service after this long with no connection (e.g.
    /// `30s`; 100ms to 1y). Without it the service is never parked for idleness.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Snapshot mode: what parking keeps (`fresh`: the pristine image; `keep`: its state).
    #[arg(long, value_enum, default_value = "fresh")]
    on_idle: OnIdle,
    /// Snapshot mode: register this prebuilt image instead of running a
    /// command (it takes no command). Its directory, its path and its files
    /// must be owned by root and not writable by group or others.
    #[arg(long, conflicts_with_all = ["exec", "inetd"])]
    image: Option<PathBuf>,
    /// Snapshot mode: pages copied in ahead of faults on a wake (`recorded`:
    /// the working set the first wake recorded; `all`: every page; `none`).
    #[arg(long, value_enum, default_value = "recorded")]
    prefetch: Prefetch,
    /// Snapshot mode: on a wake, reopen a recorded file whose path names
    /// another file now (other inode or device) instead of failing the wake.
    #[arg(long)]
    accept_changed_files: bool,
    /// Snapshot mode: whether a prepared skeleton waits for the next wake
    /// while parked (`always`; `auto`: while the daemon's
    /// `--skeleton-budget` allows; `never`: the image only, a cold wake).
    #[arg(long, value_enum, default_value = "auto")]
    keep_skeleton: KeepSkeleton,
    /// Snapshot mode: run the command with address-space layout
    /// randomisation off, so that services of one program (the same command
    /// but for the port, user and readiness) have alike memory and their
    /// images store the pages they have in common once. Every such service
    /// of the program has the same, predictable, layout.
    #[arg(long, conflicts_with_all = ["exec", "inetd", "image"])]
    share_pages: bool,
    #[command(flatten)]
    ready: ReadyArgs,
    /// The command and its arguments (none with --image).
    #[arg(last = true, required_unless_present = "image")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            let line = persist_agent::error_text::chain_line(err.chain());
            eprintln!("persist-agent: error: {line}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    // Documentation of the command line itself needs no privilege.
    let documentation = matches!(
        cli.command,
        Command::Completions { .. } | Command::ManPages { .. }
    );
    if !documentation && !nix::unistd::geteuid().is_root() {
        bail!("persist-agent must run as root (it loads BPF programs and traces processes)");
    }
    match cli.command {
        Command::Daemon {
            metrics,
            keep_generations,
            services_dir,
            log_max_bytes,
            restore_threads,
            skeleton_budget,
        } => {
            let options = daemon::DaemonOptions {
                metrics,
                keep_generations: keep_generations as usize,
                services_dir,
                log_max_bytes,
                restore_threads: restore_threads
                    .map_or_else(daemon::default_restore_threads, |n| n as usize),
                skeleton_budget,
            };
            daemon::run(&cli.state_dir, &options)?;
        }
        Command::KeepPorts => daemon::run_keeper()?,
        Command::Reload => {
            let reply = control::call(&cli.state_dir, &Request::Reload)?;
            println!("{}", reply.message);
        }
        Command::Check { path } => return check(&path),
        Command::Logs { name, follow } => {
            persist_agent::service::ServiceSpec::check_name(&name)?;
            let logs = cli.state_dir.join("logs");
            service_log::show(&logs, &name, follow, &mut std::io::stdout().lock())?;
        }
        Command::Add(args) => {
            let spec = service_spec(args)?;
            let reply = control::call(&cli.state_dir, &Request::Add { spec })?;
            println!("{}", reply.message);
        }
        Command::Remove { name } => {
            let reply = control::call(&cli.state_dir, &Request::Remove { name })?;
            println!("{}", reply.message);
        }
        Command::Park { name } => {
            let reply = control::call(&cli.state_dir, &Request::Park { name })?;
            println!("{}", reply.message);
        }
        Command::Wake { name } => {
            let reply = control::call(&cli.state_dir, &Request::Wake { name })?;
            println!("{}", reply.message);
        }
        Command::History { name, json } => {
            let reply = control::call(&cli.state_dir, &Request::History { name })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply.history)?);
            } else {
                print!("{}", control::history_table(&reply.history));
            }
        }
        Command::Rollback { name, to } => {
            let reply = control::call(&cli.state_dir, &Request::Rollback { name, to })?;
            println!("{}", reply.message);
        }
        Command::Snapshot { name, tag } => {
            let reply = control::call(&cli.state_dir, &Request::Snapshot { name, tag })?;
            println!("{}", reply.message);
        }
        Command::Status { json, names } => {
            let reply = control::call(&cli.state_dir, &Request::Status { names })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply.services)?);
            } else {
                print!("{}", control::status_table(&reply.services));
                if let Some(skeletons) = reply
                    .skeletons
                    .filter(|_| reply.services.iter().any(|s| s.mode == "snapshot"))
                {
                    println!("{skeletons}");
                }
            }
        }
        Command::Build(args) => {
            let log = args.log.clone().unwrap_or_else(|| {
                let mut name = args.image.clone().into_os_string();
                name.push(".log");
                name.into()
            });
            let request = snapshot::BuildRequest {
                command: args.command,
                addr: args.addr,
                port: args.port,
                user: args.ready.user,
                ready: args.ready.ready,
                ready_timeout: args.ready.ready_timeout,
                warmup_requests: args.ready.warmup_requests,
                warmup_command: args.ready.warmup_command,
                image: args.image.clone(),
                log,
                runtime_dir: std::env::temp_dir(),
                no_aslr: false,
                sibling: None,
            };
            let built = snapshot::build(&request)
                .with_context(|| format!("building {}", args.image.display()))?;
            println!(
                "built {}: ready after {:.1} ms, {} pages ({} bytes) in the image",
                args.image.display(),
                built.ready_after.as_secs_f64() * 1e3,
                built.summary.pages,
                built.summary.page_store_bytes
            );
        }
        Command::Checkpoint {
            pid,
            image,
            leave_running,
            base,
            recovery_file,
            tree,
        } => {
            let options = checkpoint::CheckpointOptions {
                pid,
                image,
                leave_running,
                // A process this agent restored holds its userfaultfd.
                exclude_fds: checkpoint::restorer_userfaultfds(pid),
                base,
                base_is_sibling: false,
                agent_files: Vec::new(),
                recovery_file,
                tree,
                // Everything is saved: the caller knows its process.
                client_ports: Vec::new(),
            };
            let summary = checkpoint::checkpoint(&options)
                .with_context(|| format!("checkpoint of pid {pid}"))?;
            println!("{summary}");
        }
        Command::Restore {
            image,
            accept_changed_files,
        } => {
            let options = restore::RestoreOptions {
                image: image.clone(),
                accept_changed_files,
            };
            let pid = restore::restore_detached(&options)
                .with_context(|| format!("restore of {}", image.display()))?;
            println!("{pid}");
        }
        Command::Recover { file } => {
            match checkpoint::recover(&file)
                .with_context(|| format!("recovering from {}", file.display()))?
            {
                checkpoint::Recovered::Gone { pid } => println!("pid {pid} is gone"),
                checkpoint::Recovered::Resumed { pid, threads } => {
                    println!("pid {pid} runs again ({threads} threads put back)")
                }
            }
        }
        Command::Inspect { image } => {
            print!("{}", inspect::inspect(&image)?);
        }
        Command::Completions { shell } => {
            let mut command = Cli::command();
            let name = command.get_name().to_owned();
            // Into memory first: clap_complete panics on a write error.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, name, &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .context("writing the completion script to stdout")?;
        }
        Command::ManPages { dir } => {
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `check`: every service file of a directory (or one file), each error
/// on a line of its own; fails if any file has one.
fn check(path: &std::path::Path) -> Result<ExitCode> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("checking {}", path.display()))?;
    let declared = if metadata.is_dir() {
        service_file::load_dir(path)?
    } else {
        vec![service_file::DeclaredService {
            name: String::new(),
            path: path.to_owned(),
            spec: service_file::load_file(path),
        }]
    };
    let mut failed = 0;
    for service in &declared {
        match &service.spec {
            Ok(spec) => println!(
                "{}: ok ({} on {})",
                service.path.display(),
                spec.mode.as_str(),
                std::net::SocketAddr::new(spec.addr, spec.port)
            ),
            Err(err) => {
                failed += 1;
                eprintln!("{}", persist_agent::error_text::error_line(err));
            }
        }
    }
    if declared.is_empty() {
        println!("{}: no service files (NAME.toml)", path.display());
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("{failed} of {} service files have errors", declared.len());
        ExitCode::FAILURE
    })
}

fn service_spec(args: AddArgs) -> Result<ServiceSpec> {
    let mode = match (args.exec, args.inetd) {
        (true, false) => ServiceMode::Exec,
        (false, true) => ServiceMode::Inetd,
        (false, false) => ServiceMode::Snapshot,
        (true, true) => bail!("--exec and --inetd exclude each other"),
    };
    let image = args
        .image
        .map(|image| std::path::absolute(&image).with_context(|| format!("{}", image.display())))
        .transpose()?;
    let snapshot = (mode == ServiceMode::Snapshot).then_some(SnapshotSpec {
        user: args.ready.user,
        ready: args.ready.ready,
        ready_timeout: args.ready.ready_timeout,
        warmup_requests: args.ready.warmup_requests,
        warmup_command: args.ready.warmup_command,
        on_idle: args.on_idle,
        image,
        prefetch: args.prefetch,
        accept_changed_files: args.accept_changed_files,
        keep_skeleton: args.keep_skeleton,
        share_pages: args.share_pages,
    });
    let spec = ServiceSpec {
        name: args.name,
        addr: args.addr,
        port: args.port,
        mode,
        idle_timeout: args.idle_timeout,
        command: args.command,
        snapshot,
        declared_in: None,
    };
    spec.validate()?;
    Ok(spec)
}
