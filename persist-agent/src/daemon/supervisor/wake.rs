//! The wake path of one service: start its command or resume its prepared
//! skeleton, record the wake, or show it failed with the reason.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use persist_common::bpf::BpfState;
use tracing::{info, warn};

use super::super::listener;
use super::super::restore_worker::ResumeRefused;
use super::{
    Child, Command, PAGER_OUTCOME_POLLS, RETRY_BACKOFF, Started, Starter, State, Supervisor,
    WokenBy, since_monotonic_us,
};
use crate::launch;

impl Supervisor {
    /// Whether the restore thread resumed the skeleton on a SYN and the news
    /// has not reached this task yet.
    pub(super) fn syn_resume_unreported(&self) -> bool {
        match &self.starter {
            Starter::Restore { worker, .. } => {
                worker
                    .report()
                    .lock()
                    .expect("report lock")
                    .syn_resumes_unreported
                    > 0
            }
            Starter::Command { .. } => false,
        }
    }

    /// Why the restored process `pid` was killed by its pager, if it was (a
    /// page of the image could not be served): its wake failed.
    pub(super) async fn wake_failure(&self, pid: i32) -> Option<String> {
        let Starter::Restore { worker, .. } = &self.starter else {
            return None;
        };
        let report = worker.report();
        // The pager kills the process before it returns: its outcome is
        // a moment behind the exit.
        for _ in 0..PAGER_OUTCOME_POLLS {
            if report.lock().expect("report lock").serving != Some(pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut report = report.lock().expect("report lock");
        match report.wake_error.take() {
            Some((killed, err)) if killed == pid => Some(err),
            other => {
                report.wake_error = other;
                None
            }
        }
    }

    pub(super) fn heard_of_syn_resume(&self) {
        if let Starter::Restore { worker, .. } = &self.starter {
            worker
                .report()
                .lock()
                .expect("report lock")
                .syn_resume_settled();
        }
    }

    /// The wake path: exec the command, or resume the prepared skeleton.
    pub(super) async fn start(&mut self, syn_ns: Option<u64>) {
        self.publish(State::Waking, None);
        let started = match &self.starter {
            // fork and exec block: the runtime's other tasks move to
            // another worker meanwhile.
            Starter::Command { log } => tokio::task::block_in_place(|| {
                let log =
                    crate::service_log::open(log).map_err(|source| launch::LaunchError::Log {
                        path: log.clone(),
                        source,
                    })?;
                launch::exec_with_listener(&self.spec, self.listener.as_fd(), log.as_fd())
            })
            .map(|spawned| Started {
                pid: spawned.pid,
                pidfd: std::sync::Arc::new(spawned.pidfd),
                namespace_init: None,
                resume_us: None,
                running_at_ns: None,
            })
            .map_err(|err| err.to_string()),
            Starter::Restore { worker, .. } => match worker.resume().await {
                // A SYN resumed it meanwhile: its `Resumed` command is next.
                Err(ResumeRefused::AlreadyResumed) => return,
                Err(ResumeRefused::Failed(err)) => Err(err),
                Ok(resumed) => Ok(Started::from(resumed)),
            },
        };
        self.started(started, syn_ns, WokenBy::Supervisor);
    }

    /// Takes over a process a SYN resumed, or records why it failed.
    pub(super) fn started(
        &mut self,
        started: Result<Started, String>,
        syn_ns: Option<u64>,
        by: WokenBy,
    ) {
        match started {
            Ok(Started {
                pid,
                pidfd,
                namespace_init,
                resume_us,
                running_at_ns,
            }) => {
                if resume_us.is_some() {
                    self.published
                        .lock()
                        .expect("published lock")
                        .last_resume_us = resume_us;
                }
                let latency = syn_ns.map(|syn| match running_at_ns {
                    Some(running) => running.saturating_sub(syn) / 1000,
                    None => since_monotonic_us(syn),
                });
                self.record_wake(pid, latency, by);
                if matches!(self.starter, Starter::Restore { .. }) {
                    self.deep_backlog_since = Some(Instant::now());
                    self.restored_generation();
                }
                // A restored process was recorded when its skeleton was
                // prepared (same pid): nothing to write while it answers
                // its first request.
                if matches!(self.starter, Starter::Command { .. }) {
                    self.run_state
                        .record_process(&self.spec.name, pid, &self.listener, &[], None);
                }
                match Child::new(pid, pidfd) {
                    Ok(mut child) => {
                        child.namespace_init = namespace_init;
                        self.child = Some(child);
                    }
                    Err(err) => warn!(service = %self.spec.name, "cannot watch pid {pid}: {err}"),
                }
            }
            Err(err) => self.fail_start(err),
        }
    }

    /// The wake failed: queued clients get a closed connection now rather
    /// than a hang, and the service shows `failed` (or `stale`) with the
    /// reason until a wake succeeds. SYNs wake it again after a backoff.
    pub(super) fn fail_start(&mut self, err: String) {
        warn!(service = %self.spec.name, "start failed: {err}");
        for listener in self.listeners() {
            while listener::has_pending(listener) {
                match nix::sys::socket::accept(listener.as_raw_fd()) {
                    Ok(fd) => drop(nix::unistd::close(fd)),
                    Err(_) => break,
                }
            }
        }
        let stale = match &self.starter {
            Starter::Restore { worker, .. } => worker.report().lock().expect("report lock").stale,
            Starter::Command { .. } => false,
        };
        self.hold_backlog();
        {
            let mut published = self.published.lock().expect("published lock");
            published.state = if stale { State::Stale } else { State::Failed };
            published.pid = None;
            published.sessions.clear();
            published.error = Some(err);
        }
        let watcher = self.watcher.clone();
        let slot = self.slot;
        let retry = self.retry.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RETRY_BACKOFF).await;
            let _ = watcher
                .lock()
                .expect("watcher lock")
                .set_state(slot, BpfState::Parked);
            if let Some(retry) = retry.upgrade() {
                let _ = retry.send(Command::Retry);
            }
        });
    }

    pub(super) fn record_wake(&mut self, pid: i32, latency_us: Option<u64>, by: WokenBy) {
        self.running_since = Instant::now();
        self.metrics
            .observe_wake(&self.spec.name, latency_us.map(Duration::from_micros));
        self.set_bpf_state(BpfState::Running);
        let mut published = self.published.lock().expect("published lock");
        published.state = State::Running;
        published.pid = Some(pid);
        published.sessions = vec![pid];
        published.wakes += 1;
        published.last_woken = Some(Instant::now());
        published.error = None;
        if latency_us.is_some() {
            published.last_wake_us = latency_us;
        }
        info!(service = %self.spec.name, pid, wake_us = ?latency_us, by = by.as_str(), "woken");
    }
}
