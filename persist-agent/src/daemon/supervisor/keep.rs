//! Parking a running service: stopped at once, or, with `--on-idle keep`,
//! checkpointed first (only the pages changed since its restore), so the
//! next wake goes on where it stopped. A state that cannot be kept leaves
//! the service running, with the reason published.

use std::time::{Duration, Instant};

use persist_common::bpf::BpfState;
use tracing::{info, warn};

use super::{Generation, Starter, State, Supervisor};
use crate::checkpoint::{CheckpointError, CheckpointOptions, checkpoint, restorer_userfaultfds};
use crate::service::OnIdle;

impl Supervisor {
    /// Parks the running service; a failure leaves it running.
    pub(super) async fn park_now(&mut self) -> Result<(), String> {
        self.stop_to_park().await?;
        self.park();
        Ok(())
    }

    /// Stops the process for parking: a snapshot service with `--on-idle
    /// keep` is checkpointed first so the next wake goes on from here. When
    /// its state cannot be kept, the process is left running (the checkpoint
    /// let it go on untouched) and the error says why: parking would lose
    /// the state.
    pub(super) async fn stop_to_park(&mut self) -> Result<(), String> {
        // A kept state records the listener as the service set it up.
        self.give_back_backlog();
        let keep = self
            .spec
            .snapshot
            .as_ref()
            .is_some_and(|s| s.on_idle == OnIdle::Keep);
        if keep && self.child.is_some() && matches!(self.starter, Starter::Restore { .. }) {
            self.keep_generation(false, None).await?;
        }
        self.stop().await;
        self.running_generation = None;
        self.prepare_next();
        Ok(())
    }

    /// Checkpoints the running restored process into a new generation (only
    /// the pages changed since its restore are written), which the next
    /// wake restores. With `leave_running` the process goes on (`snapshot`);
    /// else it is stopped for parking and left so. A state that cannot be
    /// kept leaves the process running, with the error published.
    pub(super) async fn keep_generation(
        &mut self,
        leave_running: bool,
        tag: Option<String>,
    ) -> Result<Generation, String> {
        let (
            Some(child),
            Starter::Restore {
                generations, next, ..
            },
        ) = (&self.child, &self.starter)
        else {
            return Err("no restored process runs".into());
        };
        let pid = child.pid;
        let running = self.running_generation.unwrap_or(*next);
        let (generation, image) = generations
            .next()
            .map_err(|err| crate::error_text::error_line(&err))?;
        if !leave_running {
            self.publish(State::Stopping, Some(pid));
            self.set_bpf_state(BpfState::Stopping);
        }
        // A service restored as a tree (a master and its workers) is
        // checkpointed whole; one restored as a single process is refused
        // while it has a child (redis's background save), as before: a
        // passing child is no part of the service to be restored. A
        // recovery file undoes the checkpoint of one process only: a
        // daemon killed while it checkpoints a tree leaves the tree in a
        // group stop (a thread in an injected call stops on its way back to
        // user space), and the next daemon kills it and parks the service
        // from its last kept state (`takeover.rs`): the state since then is
        // lost, never run on.
        let tree = image_is_tree(&generations.path(running));
        let options = CheckpointOptions {
            pid,
            image,
            leave_running,
            exclude_fds: restorer_userfaultfds(pid),
            base: Some(generations.path(running)),
            base_is_sibling: false,
            agent_files: Vec::new(),
            // A daemon killed meanwhile leaves the process stopped; the
            // next one undoes the checkpoint and adopts it.
            recovery_file: (!tree).then(|| self.run_state.checkpoint_path(&self.spec.name)),
            // A client still connected keeps the service running; its
            // outbound connections are kept with it.
            client_ports: vec![self.spec.port],
            tree,
        };
        let started = Instant::now();
        let mut result = checkpoint_when_filled(options.clone()).await;
        if let Ok(Err(err)) = &result
            && err.is_base_unusable()
        {
            warn!(service = %self.spec.name, "keeping only the changed pages is not possible, keeping all: {err}");
            let full = CheckpointOptions {
                base: None,
                ..options
            };
            result = checkpoint_when_filled(full).await;
        }
        self.metrics
            .observe_checkpoint(&self.spec.name, started.elapsed());
        crate::sys::alloc::give_back_free_memory();
        let Starter::Restore {
            generations, next, ..
        } = &mut self.starter
        else {
            unreachable!("checked above");
        };
        let summary = match result {
            Ok(Ok(summary)) => summary,
            failed => {
                generations.discard_unrecorded(generation);
                let err = match failed {
                    Ok(Err(err)) => crate::error_text::error_line(&err),
                    Err(err) => format!("checkpoint task: {err}"),
                    Ok(Ok(_)) => unreachable!("matched above"),
                };
                return Err(if leave_running {
                    err
                } else {
                    self.keep_failed(err)
                });
            }
        };
        let new_bytes = summary.pages_written * persist_common::image::PAGE_SIZE;
        if let Err(err) = generations.add(generation, new_bytes, tag, running) {
            generations.discard_unrecorded(generation);
            let err = crate::error_text::error_line(&err);
            return Err(if leave_running {
                err
            } else {
                self.keep_failed(err)
            });
        }
        *next = generation;
        info!(
            service = %self.spec.name,
            %generation,
            pages_written = summary.pages_written,
            pages_reused = summary.pages_reused,
            base_stores = summary.base_stores,
            "state kept for the next wake"
        );
        self.keep_failed = None;
        let mut published = self.published.lock().expect("published lock");
        published.error = None;
        if !leave_running {
            published.generation = Some(generation);
        }
        Ok(generation)
    }

    /// The state of a running service could not be kept: it runs on, and
    /// the error is published and returned.
    pub(super) fn keep_failed(&mut self, err: String) -> String {
        let message = format!("cannot park with its state kept, left running: {err}");
        warn!(service = %self.spec.name, "{message}");
        let failures = self.keep_failed.map_or(1, |(_, failures)| failures + 1);
        self.keep_failed = Some((Instant::now(), failures));
        let pid = self.child.as_ref().map(|child| child.pid);
        self.publish(State::Running, pid);
        self.set_bpf_state(BpfState::Running);
        self.published.lock().expect("published lock").error = Some(message.clone());
        message
    }
}

/// Checkpoints a restored process once its pager has brought all its memory
/// in (a page not yet served is not in the process to be saved).
async fn checkpoint_when_filled(
    options: CheckpointOptions,
) -> Result<Result<crate::checkpoint::CheckpointSummary, CheckpointError>, tokio::task::JoinError> {
    let deadline = Instant::now() + FILL_WAIT;
    loop {
        let attempt = options.clone();
        let result = tokio::task::spawn_blocking(move || checkpoint(&attempt)).await;
        match result {
            Ok(Err(CheckpointError::UserfaultfdPending { .. })) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Whether the image in `dir` holds a tree of processes; an image that
/// cannot be read says no (its checkpoint then refuses a child by pid).
fn image_is_tree(dir: &std::path::Path) -> bool {
    persist_common::image::Image::open(dir).is_ok_and(|image| image.manifest().is_tree())
}

/// How long `--on-idle keep` waits for the pager to finish filling memory.
const FILL_WAIT: Duration = Duration::from_secs(10);
