//! Keeps every service's log under its size limit (`service_log`).
//!
//! A log grows only while a process of its service runs: the services
//! write their logs themselves, the daemon never does. So each round looks
//! at the logs of the services that have a process now or had one since the
//! last round (their [`ProcessMark`] changed), and a parked service's log is
//! left alone. With 10,000 services parked, opening every log each second
//! was most of the 7.4 % of a CPU the idle daemon took from the wakes
//! (docs/benchmarks.md, 2026-12-05 08:00). A slow sweep looks at every log
//! once per [`SWEEP_ROUNDS`] rounds all the same, in case a process the
//! daemon does not know of writes to one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::Registry;
use super::supervisor::{Handle, Published, State};

/// How often the logs of running services are checked against the limit.
const ROUND: Duration = Duration::from_secs(1);

/// Every log is looked at once in this many rounds (ten minutes).
const SWEEP_ROUNDS: u64 = 600;

/// Keeps every service's log under `max_bytes`, until the daemon exits.
pub(super) async fn rotate_logs(registry: Arc<Registry>, logs_dir: PathBuf, max_bytes: u64) {
    let mut ticks = tokio::time::interval(ROUND);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = LogWatch::default();
    loop {
        ticks.tick().await;
        let names = watch.round(&registry);
        if names.is_empty() {
            continue;
        }
        let logs: Vec<PathBuf> = names
            .iter()
            .map(|name| crate::service_log::path(&logs_dir, name))
            .collect();
        let Ok((rotated, failed)) =
            tokio::task::spawn_blocking(move || crate::service_log::rotate_each(logs, max_bytes))
                .await
        else {
            continue;
        };
        for log in rotated {
            info!("rotated {} (larger than {max_bytes} bytes)", log.display());
        }
        for (log, err) in failed {
            warn!("rotating {}: {err}", log.display());
        }
    }
}

/// What a service's processes were at a round: its log could have grown
/// since only if this changed, or if a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessMark {
    /// Which registration: a service added again in a removed one's slot
    /// is another.
    registration: usize,
    state: State,
    pid: Option<i32>,
    wakes: u64,
    sessions: usize,
}

impl ProcessMark {
    fn of(handle: &Handle, published: &Published) -> Self {
        Self {
            registration: Arc::as_ptr(&handle.published) as usize,
            state: published.state,
            pid: published.pid,
            wakes: published.wakes,
            sessions: published.sessions.len(),
        }
    }

    /// Whether no process of the service can be writing its log now.
    fn quiet(&self) -> bool {
        matches!(self.state, State::Parked | State::Failed | State::Stale)
            && self.pid.is_none()
            && self.sessions == 0
    }
}

/// The marks of the last round, by slot, each with the round that saw it.
#[derive(Debug, Default)]
struct LogWatch {
    rounds: u64,
    marks: HashMap<u32, (ProcessMark, u64)>,
}

impl LogWatch {
    /// The services whose log this round looks at.
    fn round(&mut self, registry: &Registry) -> Vec<String> {
        self.rounds += 1;
        let round = self.rounds;
        let sweep = round % SWEEP_ROUNDS;
        let mut names = Vec::new();
        registry.visit_services(|handle| {
            let mark = ProcessMark::of(handle, &handle.published.lock().expect("published lock"));
            let last = self.marks.insert(handle.slot, (mark, round));
            let changed = last.is_none_or(|(last, _)| last != mark);
            if changed || !mark.quiet() || u64::from(handle.slot) % SWEEP_ROUNDS == sweep {
                names.push(handle.spec.name.clone());
            }
        });
        // Slots no service holds any more.
        self.marks.retain(|_, (_, seen)| *seen == round);
        names
    }
}
