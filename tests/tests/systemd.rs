//! The systemd protocol as the unit uses it (`Type=notify`, `WatchdogSec`):
//! `outpost run` sends READY=1 once ready, WATCHDOG=1 at half the watchdog
//! interval while it runs, and STOPPING=1 when it drains after SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_tests::*;

/// The next notification, or `None` after `timeout`.
fn next(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).ok()?;
    let mut buf = [0u8; 256];
    let k = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..k]).into_owned())
}

#[test]
fn ready_watchdog_and_stopping_reach_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    // The embedded default: simulated sensors, no broker, runs until a signal.
    let mut child = Command::new(outpost_bin())
        .arg("run")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000")
        .env("STATE_DIRECTORY", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = next(&sock, Duration::from_secs(60));
    assert_eq!(first.as_deref(), Some("READY=1"));
    // Pings every 100 ms: five of them within a few seconds.
    let start = Instant::now();
    let mut pings = 0;
    while pings < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{pings} watchdog pings in 10 s"
        );
        if let Some(m) = next(&sock, Duration::from_secs(10)) {
            assert_eq!(m, "WATCHDOG=1");
            pings += 1;
        }
    }
    // SAFETY: kill(2) with the pid of a child we own.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let mut stopping = false;
    while let Some(m) = next(&sock, Duration::from_secs(20)) {
        if m == "STOPPING=1" {
            stopping = true;
            break;
        }
        assert_eq!(m, "WATCHDOG=1");
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    assert!(child.wait().unwrap().success());
}
