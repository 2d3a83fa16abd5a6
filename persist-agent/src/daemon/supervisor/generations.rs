//! The supervisor's side of a service's generations: rolling back past one
//! whose process crashed soon after its wake, and the owner's requests
//! (`history`, `rollback`, `snapshot`).

use std::time::Duration;

use nix::sys::wait::WaitStatus;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{Starter, State, Supervisor};
use crate::control::HistoryEntry;
use crate::daemon::generations::{Generation, GenerationRecord, Generations};

/// A process restored from a kept generation that crashes this soon after
/// its wake marks that generation bad: its state, not the wake, is the
/// likely cause, and restoring it again would crash again.
pub const CRASH_GRACE: Duration = Duration::from_secs(10);

/// A request about a service's generations.
#[derive(Debug)]
pub enum GenerationsCommand {
    /// List them (`persist-agent history`).
    History {
        /// Answered with the kept generations, oldest first.
        done: oneshot::Sender<Result<Vec<HistoryEntry>, String>>,
    },
    /// Make the next wake restore `to`, or the good generation before the
    /// current one (`persist-agent rollback`). A running process is stopped
    /// without keeping its state.
    Rollback {
        /// The generation to go back to.
        to: Option<Generation>,
        /// Answered with what was done.
        done: oneshot::Sender<Result<String, String>>,
    },
    /// Keep the running service's state as a new generation without parking
    /// it, or tag the current generation of a parked one
    /// (`persist-agent snapshot`).
    Snapshot {
        /// A name that keeps it from ever being pruned.
        tag: Option<String>,
        /// Answered with what was done.
        done: oneshot::Sender<Result<String, String>>,
    },
}

impl GenerationsCommand {
    /// Answers the request with `why` it cannot be done.
    pub fn refuse(self, why: &str) {
        match self {
            Self::History { done } => drop(done.send(Err(why.to_owned()))),
            Self::Rollback { done, .. } | Self::Snapshot { done, .. } => {
                drop(done.send(Err(why.to_owned())))
            }
        }
    }
}

/// Whether an exit is a crash: killed by a signal or exited with an error.
/// A process that is not our child (restored inside its own pid namespace,
/// or started by a previous daemon) leaves no status: counted as a crash,
/// since it ended within the grace period anyway.
fn crash_reason(status: Option<WaitStatus>, ran_for: Duration) -> Option<String> {
    let after = format!("{:.1} s after its wake", ran_for.as_secs_f64());
    match status {
        Some(WaitStatus::Signaled(_, signal, _)) => Some(format!("killed by {signal} {after}")),
        Some(WaitStatus::Exited(_, code)) if code != 0 => {
            Some(format!("exited with status {code} {after}"))
        }
        Some(_) => None,
        None => Some(format!("ended {after}")),
    }
}

impl Supervisor {
    /// After the exit of a process restored from a kept generation: when it
    /// crashed within [`CRASH_GRACE`], marks that generation bad and points
    /// the next wake at the newest good one. Returns whether it rolled back.
    pub(super) fn roll_back_after_crash(
        &mut self,
        status: Option<WaitStatus>,
        ran_for: Duration,
    ) -> bool {
        let Some(crashed @ Generation::Kept(_)) = self.running_generation.take() else {
            return false;
        };
        if ran_for >= CRASH_GRACE {
            return false;
        }
        let Some(reason) = crash_reason(status, ran_for) else {
            return false;
        };
        let Starter::Restore {
            generations, next, ..
        } = &mut self.starter
        else {
            return false;
        };
        if let Err(err) = generations.mark_bad(crashed, reason.clone()) {
            warn!(service = %self.spec.name, "recording generation {crashed} as bad: {err}");
        }
        *next = generations.current();
        let note = format!(
            "generation {crashed} {reason}: rolled back to generation {next}",
            next = *next
        );
        warn!(service = %self.spec.name, "{note}");
        self.metrics.observe_rollback(&self.spec.name);
        let mut published = self.published.lock().expect("published lock");
        published.generation = Some(*next);
        published.note = Some(note);
        true
    }

    /// Notes which generation a restored process came from.
    pub(super) fn restored_generation(&mut self) {
        if let Starter::Restore {
            generations, next, ..
        } = &mut self.starter
        {
            generations.count_wake(*next);
            self.running_generation = Some(*next);
            self.published.lock().expect("published lock").generation = Some(*next);
        }
    }

    /// Answers a request about the generations.
    pub(super) async fn generations_request(&mut self, request: GenerationsCommand) {
        if !matches!(self.starter, Starter::Restore { .. }) {
            request.refuse("only a snapshot service has generations");
            return;
        }
        match request {
            GenerationsCommand::History { done } => drop(done.send(Ok(self.history()))),
            GenerationsCommand::Rollback { to, done } => {
                let _ = done.send(self.roll_back_to(to).await);
            }
            GenerationsCommand::Snapshot { tag, done } => {
                let _ = done.send(self.snapshot(tag).await);
            }
        }
    }

    fn history(&self) -> Vec<HistoryEntry> {
        let Starter::Restore {
            generations, next, ..
        } = &self.starter
        else {
            return Vec::new();
        };
        let running = self.child.as_ref().and(self.running_generation);
        let entry = |generation: Generation, record: Option<&GenerationRecord>| HistoryEntry {
            generation: generation.to_string(),
            created_unix_ms: record.map(|r| r.created_unix_ms),
            new_bytes: record.map(|r| r.new_bytes),
            wakes: record.map(|r| r.wakes),
            bad: record.and_then(|r| r.bad.clone()),
            tag: record.and_then(|r| r.tag.clone()),
            running: running == Some(generation),
            next: self.child.is_none() && *next == generation,
        };
        std::iter::once(entry(Generation::Pristine, None))
            .chain(
                generations
                    .records()
                    .iter()
                    .map(|record| entry(Generation::Kept(record.number), Some(record))),
            )
            .collect()
    }

    async fn roll_back_to(&mut self, to: Option<Generation>) -> Result<String, String> {
        let from = self.running_generation.filter(|_| self.child.is_some());
        let Starter::Restore {
            generations, next, ..
        } = &mut self.starter
        else {
            return Err("only a snapshot service has generations".into());
        };
        let target = match to {
            Some(target) => target,
            None => previous_good(generations, from.unwrap_or(*next))
                .ok_or("already at the pristine image: nothing to roll back to")?,
        };
        generations
            .roll_back_to(target)
            .map_err(|err| crate::error_text::error_line(&err))?;
        *next = target;
        // The state the process has now is the one given up: not kept.
        self.stop().await;
        self.running_generation = None;
        {
            let mut published = self.published.lock().expect("published lock");
            published.generation = Some(target);
            published.note = Some(format!("rolled back by hand to generation {target}"));
        }
        info!(service = %self.spec.name, %target, "rolled back by hand");
        self.prepare_next();
        if self.state() != State::Failed {
            self.park();
        }
        Ok(format!("the next wake restores generation {target}"))
    }

    async fn snapshot(&mut self, tag: Option<String>) -> Result<String, String> {
        if self.child.is_none() {
            let Starter::Restore {
                generations, next, ..
            } = &mut self.starter
            else {
                return Err("only a snapshot service has generations".into());
            };
            let (Some(tag), Generation::Kept(_)) = (tag, *next) else {
                return Err(
                    "the service is parked: its state is the generation it will wake from; \
                     give --tag to keep that one for good"
                        .into(),
                );
            };
            generations
                .tag(*next, tag.clone())
                .map_err(|err| crate::error_text::error_line(&err))?;
            return Ok(format!("tagged generation {next} {tag:?}", next = *next));
        }
        let generation = self.keep_generation(true, tag).await?;
        Ok(format!("kept the running state as generation {generation}"))
    }
}

/// The newest good generation older than `current`, the pristine image
/// being the oldest of all.
fn previous_good(generations: &Generations, current: Generation) -> Option<Generation> {
    let Generation::Kept(current) = current else {
        return None;
    };
    Some(
        generations
            .records()
            .iter()
            .rev()
            .find(|record| record.number < current && record.bad.is_none())
            .map_or(Generation::Pristine, |record| {
                Generation::Kept(record.number)
            }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    const SOON: Duration = Duration::from_millis(300);

    #[test]
    fn a_signal_or_an_error_status_is_a_crash_and_a_clean_exit_is_not() {
        let pid = Pid::from_raw(42);
        assert_eq!(
            crash_reason(
                Some(WaitStatus::Signaled(pid, Signal::SIGSEGV, false)),
                SOON
            )
            .as_deref(),
            Some("killed by SIGSEGV 0.3 s after its wake")
        );
        assert_eq!(
            crash_reason(Some(WaitStatus::Exited(pid, 1)), SOON).as_deref(),
            Some("exited with status 1 0.3 s after its wake")
        );
        assert_eq!(crash_reason(Some(WaitStatus::Exited(pid, 0)), SOON), None);
        assert_eq!(
            crash_reason(None, SOON).as_deref(),
            Some("ended 0.3 s after its wake")
        );
    }
}
