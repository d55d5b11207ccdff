//! systemd service notifications (the `sd_notify` protocol, without
//! libsystemd): `READY=1` once the pipeline runs, `WATCHDOG=1` while it makes
//! progress, `STOPPING=1` when it drains. Outside systemd (no
//! `$NOTIFY_SOCKET`) nothing is sent.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Errors of the notification socket.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The socket could not be made or reached.
    #[error("systemd notification socket {path}: {source}")]
    Socket {
        /// `$NOTIFY_SOCKET`.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

/// A connection to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    path: String,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `None` when it is not set (not under systemd).
    pub fn from_env() -> Option<Result<Self, NotifyError>> {
        let path = std::env::var("NOTIFY_SOCKET").ok()?;
        Some(Self::connect(&path))
    }

    /// A socket path, or `@name` for an abstract socket.
    pub fn connect(path: &str) -> Result<Self, NotifyError> {
        let err = |source| NotifyError::Socket {
            path: path.to_string(),
            source,
        };
        let addr = match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?
            }
            None => SocketAddr::from_pathname(path).map_err(err)?,
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        sock.connect_addr(&addr).map_err(err)?;
        Ok(Self {
            sock,
            path: path.to_string(),
        })
    }

    /// Send one notification, e.g. `READY=1`.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        self.sock
            .send(state.as_bytes())
            .map(|_| ())
            .map_err(|source| NotifyError::Socket {
                path: self.path.clone(),
                source,
            })
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when the
/// watchdog is on and meant for this process (`$WATCHDOG_PID`, if set).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim() != std::process::id().to_string()
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// `WATCHDOG=1` every half `WatchdogSec`, as long as the outbox writer
/// commits (it does every `outbox.fsync_interval_ms`, data or not): a
/// stuck disk or a dead writer thread stops the pings and systemd restarts
/// the service. While draining (`draining` cancelled) the pings go on
/// unconditionally: the drain is bounded by `gateway.shutdown_timeout_ms`.
pub fn spawn_watchdog(
    n: Arc<Notifier>,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
) -> Option<JoinHandle<()>> {
    let every = watchdog_interval()?;
    tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut last = u64::MAX;
        loop {
            tick.tick().await;
            let commits = metrics.outbox_commits.get();
            if commits != last || draining.is_cancelled() {
                if let Err(e) = n.notify("WATCHDOG=1") {
                    tracing::warn!(error = %e, "cannot notify systemd");
                }
            } else {
                tracing::warn!("outbox writer made no progress: systemd watchdog not fed");
            }
            last = commits;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.notify("READY=1").unwrap();
        n.notify("WATCHDOG=1").unwrap();
        let mut buf = [0u8; 64];
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1");
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"WATCHDOG=1");
    }

    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("outpost-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::connect(&format!("@{name}"))
            .unwrap()
            .notify("STOPPING=1")
            .unwrap();
        let mut buf = [0u8; 64];
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let e = Notifier::connect("/nonexistent/notify").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/notify"), "{e}");
    }
}
