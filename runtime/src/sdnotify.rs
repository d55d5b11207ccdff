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

/// What the watchdog reads at each tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Outbox group commits that succeeded so far (the writer commits every
    /// `outbox.fsync_interval_ms`, data or not).
    pub commits: u64,
    /// How long the inference pass under way has run (`None`: none runs,
    /// the thread waits for windows).
    pub inference_busy: Option<Duration>,
}

impl Progress {
    fn of(m: &Metrics) -> Self {
        Self {
            commits: m.outbox_commits.get(),
            inference_busy: m.inference_stuck_for(),
        }
    }
}

/// Whether the gateway makes progress between two ticks `every` apart:
/// the outbox writer committed successfully since `before`, and no
/// inference pass has been running for longer than `every`. `Err`: why
/// the watchdog is not fed. No I/O.
pub fn verdict(
    before: Option<Progress>,
    now: Progress,
    every: Duration,
) -> Result<(), &'static str> {
    if before.is_some_and(|b| b.commits == now.commits) {
        return Err("the outbox writer made no successful commit");
    }
    if now.inference_busy.is_some_and(|d| d > every) {
        return Err("an inference pass has not returned");
    }
    Ok(())
}

/// `WATCHDOG=1` every half `WatchdogSec`, as long as every stage makes
/// progress ([`verdict`]): the outbox writer commits successfully and the
/// inference thread answers. A disk whose commits fail, a dead writer
/// thread or a hung forward pass (a GPU that stopped answering) stops the
/// pings, and systemd restarts the service. While draining (`draining`
/// cancelled) the pings go on unconditionally: the drain is bounded by
/// `gateway.shutdown_timeout_ms`.
pub fn spawn_watchdog(
    n: Arc<Notifier>,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
) -> Option<JoinHandle<()>> {
    let every = watchdog_interval()?;
    tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut last = None;
        loop {
            tick.tick().await;
            let now = Progress::of(&metrics);
            match verdict(last, now, every) {
                Err(why) if !draining.is_cancelled() => {
                    tracing::warn!("{why}: systemd watchdog not fed");
                }
                _ => {
                    if let Err(e) = n.notify("WATCHDOG=1") {
                        tracing::warn!(error = %e, "cannot notify systemd");
                    }
                }
            }
            last = Some(now);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_fed_only_while_commits_succeed_and_inference_answers() {
        let every = Duration::from_secs(5);
        let at = |commits, busy: Option<u64>| Progress {
            commits,
            inference_busy: busy.map(Duration::from_secs),
        };
        // The first tick has nothing to compare with.
        assert_eq!(verdict(None, at(0, None), every), Ok(()));
        // Commits go on, inference idle or answering within a tick.
        assert_eq!(verdict(Some(at(3, None)), at(5, None), every), Ok(()));
        assert_eq!(verdict(Some(at(3, None)), at(5, Some(2)), every), Ok(()));
        // A failing commit does not count: no successful commit since.
        assert!(verdict(Some(at(5, None)), at(5, None), every).is_err());
        // A model that blocks forever: its pass outlives the tick.
        assert!(verdict(Some(at(5, None)), at(9, Some(6)), every).is_err());
    }

    #[test]
    fn a_pass_that_does_not_return_is_seen_and_one_that_returns_is_not() {
        let metrics = Arc::new(Metrics::new());
        assert_eq!(metrics.inference_stuck_for(), None);
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let m = metrics.clone();
        let hung = std::thread::spawn(move || {
            m.inference_pass(|| {
                entered_tx.send(()).unwrap();
                // Blocks until the test lets it go: a hung forward pass.
                let _ = released.recv();
            })
        });
        entered.recv().unwrap();
        // The blocked pass is seen, and its age grows (waited on, bounded).
        let started = std::time::Instant::now();
        while metrics.inference_stuck_for().expect("a pass runs") < Duration::from_millis(30) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the pass's age does not grow"
            );
            std::thread::yield_now();
        }
        let p = Progress::of(&metrics);
        assert!(
            verdict(
                Some(Progress { commits: 0, ..p }),
                Progress { commits: 1, ..p },
                Duration::from_millis(10)
            )
            .is_err()
        );
        release.send(()).unwrap();
        hung.join().unwrap();
        assert_eq!(metrics.inference_stuck_for(), None);
    }

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
