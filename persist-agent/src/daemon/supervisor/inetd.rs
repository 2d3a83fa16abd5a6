//! The inetd mode's event loop: one process per connection, accepted by
//! the agent, the service parked again once the last one exits.

use std::os::fd::AsFd;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::warn;

use super::{Child, Command, Starter, Supervisor, WokenBy, kill_stray, since_monotonic_us};
use crate::launch;

impl Supervisor {
    /// The inetd mode: one process per connection, accepted by the agent.
    pub(super) async fn run_inetd(
        &mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> std::io::Result<()> {
        let Starter::Command { log } = &self.starter else {
            return Err(std::io::Error::other(
                "an inetd service runs a command, not an image",
            ));
        };
        let log = log.clone();
        let listener = std::net::TcpListener::from(self.listener.try_clone()?);
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut children: JoinSet<i32> = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (connection, peer) = accepted?;
                    let stats = self.watcher.lock().expect("watcher lock").stats(self.slot);
                    let connection = connection.into_std()?;
                    connection.set_nonblocking(false)?;
                    let spawned = tokio::task::block_in_place(|| {
                        let opened = crate::service_log::open(&log).map_err(|source| {
                            launch::LaunchError::Log { path: log.clone(), source }
                        })?;
                        launch::exec_for_connection(&self.spec, connection.as_fd(), opened.as_fd())
                    });
                    match spawned {
                        Ok(spawned) => {
                            if children.is_empty() {
                                let latency = (stats.wake_syn_ns != 0).then(|| since_monotonic_us(stats.wake_syn_ns));
                                self.record_wake(spawned.pid, latency, WokenBy::Supervisor);
                            }
                            self.published.lock().expect("published lock").sessions.push(spawned.pid);
                            let child = Child::new(spawned.pid, std::sync::Arc::new(spawned.pidfd))?;
                            children.spawn(async move {
                                child.wait().await;
                                child.pid
                            });
                        }
                        Err(err) => warn!(service = %self.spec.name, %peer, "cannot start a connection handler: {err}"),
                    }
                }
                Some(finished) = children.join_next(), if !children.is_empty() => {
                    if let Ok(pid) = finished {
                        self.published.lock().expect("published lock").sessions.retain(|&p| p != pid);
                    }
                    if children.is_empty() {
                        self.park();
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Wake { .. } | Command::Retry | Command::Skeleton(_)) => {}
                    Some(Command::Resumed { result, .. }) => kill_stray(&self.spec.name, *result),
                    Some(Command::WakeNow { done }) => {
                        let _ = done.send(Err("an inetd service starts once per connection".into()));
                    }
                    Some(Command::Park { done }) => {
                        self.kill_connection_handlers();
                        let _ = done.send(Ok(()));
                    }
                    Some(Command::Generations(request)) => request.refuse("an inetd service keeps no state"),
                    Some(Command::Shutdown { done }) => {
                        self.kill_connection_handlers();
                        let _ = done.send(());
                        return Ok(());
                    }
                    None => return Ok(()),
                },
            }
        }
    }

    pub(super) fn kill_connection_handlers(&self) {
        for &pid in &self.published.lock().expect("published lock").sessions {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
}
