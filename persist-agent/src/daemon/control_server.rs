//! The daemon's end of the control socket.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use super::Registry;
use crate::control::{MAX_REQUEST_BYTES, Reply, Request, socket_path};
use crate::error_text::error_line;

/// Binds `STATE_DIR/agent.sock`, root only. The caller holds the state
/// directory's lock, so a socket file already there is a dead daemon's.
pub fn bind(state_dir: &Path) -> Result<UnixListener> {
    let path = socket_path(state_dir);
    let _ = fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Answers control requests until the daemon exits.
pub async fn serve(listener: UnixListener, registry: Arc<Registry>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let registry = registry.clone();
                tokio::spawn(async move {
                    if let Err(err) = answer(stream, &registry).await {
                        warn!("control connection: {err}");
                    }
                });
            }
            Err(err) => warn!("control socket: {err}"),
        }
    }
}

async fn answer(stream: UnixStream, registry: &Registry) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    BufReader::new(read.take(MAX_REQUEST_BYTES as u64))
        .read_until(b'\n', &mut line)
        .await?;
    let reply = if line.len() == MAX_REQUEST_BYTES && !line.ends_with(b"\n") {
        Reply::error(format!(
            "request longer than {MAX_REQUEST_BYTES} bytes refused"
        ))
    } else {
        match Request::decode(&line) {
            Ok(request) => handle(request, registry).await,
            Err(err) => Reply::error(format!("malformed request: {err}")),
        }
    };
    let mut bytes = serde_json::to_vec(&reply).expect("a reply always serialises");
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

/// Answers one request; a refusal carries the error and each of its causes.
async fn handle(request: Request, registry: &Registry) -> Reply {
    match request {
        Request::Add { mut spec } => {
            // Only a reload of the services directory declares services.
            spec.declared_in = None;
            let summary = format!(
                "added {} on {} (parked)",
                spec.name,
                std::net::SocketAddr::new(spec.addr, spec.port)
            );
            match registry.add(spec).await {
                Ok(()) => Reply::ok(summary),
                Err(err) => Reply::error(error_line(&err)),
            }
        }
        Request::Remove { name } => match registry.remove(&name).await {
            Ok(()) => Reply::ok(format!("removed {name}")),
            Err(err) => Reply::error(error_line(&err)),
        },
        Request::Park { name } => match registry.force(&name, true).await {
            Ok(()) => Reply::ok(format!("parked {name}")),
            Err(err) => Reply::error(error_line(&err)),
        },
        Request::Wake { name } => match registry.force(&name, false).await {
            Ok(()) => Reply::ok(format!("woke {name}")),
            Err(err) => Reply::error(error_line(&err)),
        },
        Request::History { name } => match registry.history(&name).await {
            Ok(history) => Reply {
                history,
                ..Reply::default()
            },
            Err(err) => Reply::error(error_line(&err)),
        },
        Request::Rollback { name, to } => match registry.rollback(&name, to.as_deref()).await {
            Ok(done) => Reply::ok(format!("{name}: {done}")),
            Err(err) => Reply::error(error_line(&err)),
        },
        Request::Snapshot { name, tag } => match registry.snapshot(&name, tag).await {
            Ok(done) => Reply::ok(format!("{name}: {done}")),
            Err(err) => Reply::error(error_line(&err)),
        },
        Request::Reload => match registry.reload().await {
            Ok(report) if report.is_clean() => Reply::ok(report.to_string()),
            Ok(report) => Reply::error(report.to_string()),
            Err(err) => Reply::error(format!(
                "services directory not applied: {}",
                error_line(&err)
            )),
        },
        Request::Status { names } if names.is_empty() => Reply {
            services: registry.status(None),
            skeletons: Some(registry.skeleton_summary()),
            ..Reply::default()
        },
        // Without the skeletons' summary, which looks at every service.
        Request::Status { names } => match registry.unknown(&names) {
            Some(name) => Reply::error(format!("unknown service: {name}")),
            None => Reply {
                services: registry.status(Some(&names)),
                ..Reply::default()
            },
        },
    }
}
