//! Harness for end-to-end tests: real Mosquitto brokers on free ports, the
//! real `outpost` binary as a child process, a real MQTT client.
//!
//! The binary is taken from `$OUTPOST_BIN`, else from the target directory
//! beside the test executable (`cargo build --bins` first: the test command
//! in `scripts/test.sh` does).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding port 0 on loopback always works")
}

/// Poll `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    if !wait_for(timeout, cond) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Poll `cond` until it holds or `timeout` passes; whether it held (for
/// callers that assert with their own message).
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A Mosquitto broker on a loopback port, killed on drop.
pub struct Broker {
    /// Its port.
    pub port: u16,
    child: Option<Child>,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Start a broker that queues without limit (so the broker is never the one losing messages).
    pub fn start() -> Broker {
        Self::start_with("")
    }

    /// Start a broker with `extra` appended to its configuration (more listeners, TLS).
    pub fn start_with(extra: &str) -> Broker {
        Self::start_on(free_port(), extra)
    }

    /// Start a broker on `port` that keeps sessions across [`Broker::restart`]
    /// (persistence on), for subscribers made with [`Subscriber::start_persistent`].
    pub fn start_persistent() -> Broker {
        Self::start_on(free_port(), "persistence true\n")
    }

    /// Start a broker on a given port.
    pub fn start_on(port: u16, extra: &str) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("mosquitto.conf");
        let persistence = if extra.contains("persistence true") {
            // Mosquitto started as root drops to its own user: let it write here.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod broker dir");
            format!("persistence_location {}/\n", dir.path().display())
        } else {
            "persistence false\n".to_string()
        };
        std::fs::write(
            &conf,
            format!(
                "allow_anonymous true\n{persistence}max_queued_messages 0\nmax_inflight_messages 0\nlog_dest stderr\nlog_type error\nlistener {port} 127.0.0.1\n{extra}"
            ),
        )
        .expect("write mosquitto.conf");
        let mut b = Broker {
            port,
            child: None,
            conf,
            _dir: dir,
        };
        b.restart();
        b
    }

    /// Stop the broker (SIGTERM: a persistent broker saves its sessions).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) with the pid of a child we own.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    /// Start it again on the same port with the same configuration.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(mosquitto())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed: run scripts/setup.sh");
        self.child = Some(child);
        let port = self.port;
        wait_until("mosquitto to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mosquitto() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("mosquitto")
}

/// How to start an `outpost` binary: the host build under test, or an ARM
/// build (cross/build.sh) under qemu-user.
#[derive(Debug, Clone)]
pub struct OutpostBin {
    program: PathBuf,
    args: Vec<String>,
}

impl OutpostBin {
    /// [`outpost_bin`].
    pub fn host() -> Self {
        Self {
            program: outpost_bin(),
            args: Vec::new(),
        }
    }

    /// `target/<target>/release/outpost`.
    pub fn cross_path(target: &str) -> PathBuf {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .expect("target dir");
        dir.join(target).join("release").join("outpost")
    }

    /// Whether the release build for `target` is there.
    pub fn cross_exists(target: &str) -> bool {
        Self::cross_path(target).exists()
    }

    /// `target/<target>/release/outpost`, run by `qemu-<arch>-static` with
    /// the Debian cross toolchain's sysroot for the dynamic loader (a static
    /// musl binary ignores it).
    pub fn cross(target: &str) -> Self {
        let bin = Self::cross_path(target);
        assert!(
            bin.exists(),
            "{} is missing: run cross/build.sh first (scripts/test.sh does)",
            bin.display()
        );
        let (qemu, sysroot) = match target.split('-').next() {
            Some("aarch64") => ("qemu-aarch64-static", "/usr/aarch64-linux-gnu"),
            Some(a) if a.starts_with("armv7") => ("qemu-arm-static", "/usr/arm-linux-gnueabihf"),
            other => panic!("no qemu for {other:?}"),
        };
        Self {
            program: PathBuf::from(qemu),
            args: vec!["-L".into(), sysroot.into(), bin.display().to_string()],
        }
    }

    /// A command that runs it; add the subcommand and its arguments.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        c
    }
}

/// The `outpost` binary under test (`$OUTPOST_BIN` overrides).
pub fn outpost_bin() -> PathBuf {
    if let Ok(p) = std::env::var("OUTPOST_BIN") {
        return PathBuf::from(p);
    }
    bin("outpost")
}

/// A binary of the workspace, from the target directory beside the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --all-targets` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Run a command to completion and assert it succeeded (its stderr in the
/// failure message); returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A running `outpost` process; killed on drop. Its stderr is collected.
pub struct Outpost {
    child: Option<Child>,
    /// The configuration file it runs on.
    pub config_path: PathBuf,
    /// Metrics port.
    pub metrics_port: u16,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Outpost {
    /// Start `outpost run` with `config` (TOML); a `[metrics]` table with a
    /// free port is appended.
    pub fn run(config: &str) -> Outpost {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("state");
        Self::start(config, dir, &state)
    }

    /// Like [`Outpost::run`], with its state (the outbox) in `state`, which
    /// outlives the process: for restarts.
    pub fn run_with_state(config: &str, state: &Path) -> Outpost {
        Self::start(config, tempfile::tempdir().expect("temp dir"), state)
    }

    /// Start with its state in `state`, without waiting for readiness (for
    /// runs that may end before anyone asks).
    pub fn spawn_with_state(config: &str, state: &Path) -> Outpost {
        Self::spawn(config, tempfile::tempdir().expect("temp dir"), state)
    }

    /// Like [`Outpost::run`] with another binary (an ARM build under qemu).
    pub fn run_bin(bin: &OutpostBin, config: &str) -> Outpost {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("state");
        let o = Self::spawn_bin(bin, config, dir, &state);
        // Emulation is slower to load the model.
        wait_until("outpost to be ready", Duration::from_secs(120), || {
            o.http("/readyz").starts_with("HTTP/1.1 200")
        });
        o
    }

    /// Like [`Outpost::run`], with environment variables set for the process.
    pub fn run_with_env(config: &str, env: &[(&str, &str)]) -> Outpost {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("state");
        let o = Self::spawn_bin_env(&OutpostBin::host(), config, dir, &state, env);
        o.wait_ready(Duration::from_secs(60));
        o
    }

    fn wait_ready(&self, timeout: Duration) {
        wait_until("outpost to be ready", timeout, || {
            self.http("/readyz").starts_with("HTTP/1.1 200")
        });
    }

    fn start(config: &str, dir: tempfile::TempDir, state: &Path) -> Outpost {
        let o = Self::spawn(config, dir, state);
        wait_until("outpost to be ready", Duration::from_secs(30), || {
            o.http("/readyz").starts_with("HTTP/1.1 200")
        });
        o
    }

    fn spawn(config: &str, dir: tempfile::TempDir, state: &Path) -> Outpost {
        Self::spawn_bin(&OutpostBin::host(), config, dir, state)
    }

    fn spawn_bin(bin: &OutpostBin, config: &str, dir: tempfile::TempDir, state: &Path) -> Outpost {
        Self::spawn_bin_env(bin, config, dir, state, &[])
    }

    fn spawn_bin_env(
        bin: &OutpostBin,
        config: &str,
        dir: tempfile::TempDir,
        state: &Path,
        env: &[(&str, &str)],
    ) -> Outpost {
        let metrics_port = free_port();
        let path = dir.path().join("outpost.toml");
        write_config(&path, config, metrics_port);
        let mut child = bin
            .command()
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("STATE_DIRECTORY", state)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        Outpost {
            child: Some(child),
            config_path: path,
            metrics_port,
            log,
            _dir: dir,
        }
    }

    /// Replace its configuration file (the same `[metrics]` table is
    /// appended); it applies on a reload.
    pub fn write_config(&self, config: &str) {
        write_config(&self.config_path, config, self.metrics_port);
    }

    /// Resident memory of the process in KiB (Linux `/proc`), 0 once it is gone.
    pub fn rss_kib(&self) -> u64 {
        self.child
            .as_ref()
            .and_then(|c| outpost::metrics::rss_kib(&c.id().to_string()))
            .unwrap_or(0)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Peak resident memory of the process in KiB (`VmHWM` in Linux
    /// `/proc/PID/status`), 0 once it is gone.
    pub fn peak_rss_kib(&self) -> u64 {
        self.pid()
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// The `aggregates=` count of the final "outpost stopped" log line.
    pub fn produced_aggregates(&self) -> u64 {
        let log = self.log();
        // The last one: a reload stops and starts the pipeline, and its
        // counts run on across the restarts.
        log.lines()
            .rev()
            .find(|l| l.contains("outpost stopped"))
            .and_then(|l| l.split("aggregates=").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no \"outpost stopped\" summary line:\n{log}"))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// GET a path of the metrics endpoint (a few tries); empty when it does not answer.
    pub fn http(&self, path: &str) -> String {
        for _ in 0..5 {
            let r = self.http_once(path);
            if r.starts_with("HTTP/1.1 ") && r.contains("\r\n\r\n") {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        String::new()
    }

    fn http_once(&self, path: &str) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        if s.write_all(request.as_bytes()).is_err() {
            return String::new();
        }
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) => out,
            Err(_) => String::new(),
        }
    }

    /// A counter or gauge from `/metrics`: the sum of every series of
    /// `name` whose labels contain all of `labels`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.http("/metrics")
            .lines()
            .filter(|l| {
                l.starts_with(name)
                    && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
            })
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Wait until `/metrics` shows `value` for `name` with `labels`; on
    /// timeout, panic with what it showed and the process log.
    pub fn wait_metric(&self, name: &str, labels: &[&str], value: f64, timeout: Duration) {
        let start = Instant::now();
        loop {
            let v = self.metric(name, labels);
            if v == value {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?}: {name}{labels:?} = {v}, expected {value}\nmetrics:\n{}\nlog:\n{}",
                    self.http("/metrics"),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) with the pid of a child we own.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Wait for the process to exit within `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("process still owned");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "outpost did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until its MQTT source has subscribed to the site topics
    /// (readings published before that would not be delivered).
    pub fn wait_subscribed(&self) {
        wait_until(
            "the site source to subscribe",
            Duration::from_secs(20),
            || self.log().contains("subscribed to site topics"),
        );
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for Outpost {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A message received by [`Subscriber`].
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A QoS 1 subscriber collecting every message on a broker.
pub struct Subscriber {
    messages: Arc<Mutex<Vec<Message>>>,
}

impl Subscriber {
    /// Subscribe to `filter` on the broker at `port`; returns once subscribed.
    pub fn start(port: u16, filter: &str) -> Subscriber {
        Self::start_session(port, filter, true)
    }

    /// Like [`Subscriber::start`] with a persistent session (clean session
    /// off): with [`Broker::start_persistent`], the subscription and queued
    /// messages survive a broker restart, and the subscriber reconnects.
    pub fn start_persistent(port: u16, filter: &str) -> Subscriber {
        Self::start_session(port, filter, false)
    }

    fn start_session(port: u16, filter: &str, clean: bool) -> Subscriber {
        let mut o = MqttOptions::new(format!("test-sub-{}", free_port()), "127.0.0.1", port);
        o.set_clean_session(clean);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        let (client, mut conn) = Client::new(o, 1000);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .expect("queue subscribe");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(Mutex::new(false));
        let (m, s) = (messages.clone(), subscribed.clone());
        std::thread::spawn(move || {
            let _client = client;
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(mut v) = m.lock() {
                            v.push(Message {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                            });
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Ok(mut v) = s.lock() {
                            *v = true;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        wait_until("SUBACK", Duration::from_secs(10), || {
            subscribed.lock().map(|v| *v).unwrap_or(false)
        });
        Subscriber { messages }
    }

    /// Messages so far.
    pub fn messages(&self) -> Vec<Message> {
        self.messages.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Payloads parsed as JSON.
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.messages()
            .iter()
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect()
    }

    /// The distinct `id`s of the JSON objects received (aggregates; a
    /// re-sent duplicate counts once).
    pub fn ids(&self) -> std::collections::BTreeSet<String> {
        self.json()
            .iter()
            .filter_map(|a| a["id"].as_str().map(str::to_string))
            .collect()
    }

    /// Wait until `produced` distinct aggregates (objects with a
    /// `window_start`) have arrived, within `timeout`.
    pub fn wait_aggregates(&self, produced: u64, timeout: Duration) {
        wait_until("every aggregate at the cloud broker", timeout, || {
            let mut ids = std::collections::BTreeSet::new();
            self.json()
                .iter()
                .filter(|a| a.get("window_start").is_some() && ids.insert(a["id"].to_string()))
                .count() as u64
                == produced
        });
    }
}

/// A QoS 1 publisher.
pub struct Publisher {
    client: Client,
    acked: Arc<Mutex<u64>>,
    sent: u64,
}

impl Publisher {
    /// Connect to the broker at `port`.
    pub fn connect(port: u16) -> Publisher {
        let mut o = MqttOptions::new(format!("test-pub-{}", free_port()), "127.0.0.1", port);
        o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        let (client, mut conn) = Client::new(o, 10_000);
        let acked = Arc::new(Mutex::new(0u64));
        let a = acked.clone();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        if let Ok(mut n) = a.lock() {
                            *n += 1;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        Publisher {
            client,
            acked,
            sent: 0,
        }
    }

    /// Publish one payload with QoS 1.
    pub fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .expect("queue publish");
        self.sent += 1;
    }

    /// Wait until the broker acknowledged everything published.
    pub fn flush(&self) {
        let sent = self.sent;
        wait_until("PUBACKs", Duration::from_secs(30), || {
            self.acked.lock().map(|n| *n >= sent).unwrap_or(false)
        });
    }
}

/// Publish `n` readings of sensor `s1` to `sensors/s1/data` on the broker at
/// `site`, 100 ms apart from a window-aligned start ten minutes ago (so the
/// first 10 s window closes at once), and wait for every PUBACK.
pub fn publish_old_readings(site: u16, n: i64) {
    let mut p = Publisher::connect(site);
    let t = now_ms() - 600_000;
    let base = t - t.rem_euclid(10_000);
    for k in 0..n {
        p.publish(
            "sensors/s1/data",
            reading("s1", base + k * 100, &[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]),
        );
    }
    p.flush();
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One JSON reading.
pub fn reading(sensor: &str, ts: i64, values: &[f32]) -> String {
    serde_json::json!({"sensor": sensor, "ts": ts, "values": values}).to_string()
}

/// A recorded fixture: eight BasicMotions test series as JSON Lines from
/// three sensors (from the dataset cache, scripts/fetch-datasets.sh), with
/// two bad lines in between. Returns the number of lines.
pub fn write_recording(path: &Path) -> usize {
    let series =
        load_ts_series(&workspace().join(".cache/datasets/BasicMotions/BasicMotions_TEST.ts"));
    let base = 1_700_000_000_000i64;
    let mut lines = Vec::new();
    for (i, (_, chans)) in series.iter().take(8).enumerate() {
        let sensor = format!("watch-{}", i % 3);
        for t in 0..chans[0].len() {
            let values: Vec<f32> = chans.iter().map(|c| c[t]).collect();
            lines.push(reading(
                &sensor,
                base + (i as i64 / 3) * 10_000 + t as i64 * 100,
                &values,
            ));
        }
    }
    // Bad lines in between are refused and counted, never fatal.
    lines.insert(50, "{oops".into());
    lines.insert(120, reading("watch-0", base, &[1.0]));
    std::fs::write(path, lines.join("\n") + "\n").expect("write recording");
    lines.len()
}

/// The series of a UCR `.ts` file: (label, channel-major values).
pub fn load_ts_series(path: &Path) -> Vec<(String, Vec<Vec<f32>>)> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-datasets.sh", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#') && !l.starts_with('@'))
        .map(|l| {
            let parts: Vec<&str> = l.trim().split(':').collect();
            let (label, chans) = parts.split_last().expect("a data line has a label");
            let chans = chans
                .iter()
                .map(|c| {
                    c.split(',')
                        .map(|v| v.trim().parse::<f32>().expect("number"))
                        .collect()
                })
                .collect();
            (label.to_string(), chans)
        })
        .collect()
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Config for a gateway `gateway` reading `sensors/<sensor>/data` from the site
/// broker on `site`, with 10 s aggregation windows and no lateness. Append an
/// `[uplink]` table (and anything else) to it.
pub fn site_config(gateway: &str, site: u16) -> String {
    format!(
        r#"
[gateway]
id = "{gateway}"
shutdown_timeout_ms = 10000

[[sources]]
type = "mqtt"
name = "site"
broker = {{ host = "127.0.0.1", port = {site} }}
topics = ["sensors/+/data"]
sensor_from = "topic:1"

[aggregation]
window_ms = 10000
allowed_lateness_ms = 0
"#
    )
}

/// An `[uplink]` table to the cloud broker on `cloud` (plain MQTT), one
/// topic per group, `outpost/<gateway>/agg/<group>`, and a health message
/// every second.
pub fn cloud_uplink(cloud: u16) -> String {
    format!(
        r#"
[uplink]
broker = {{ host = "127.0.0.1", port = {cloud} }}
allow_plaintext = true
topic = "outpost/{{gateway}}/agg/{{group}}"
health_interval_s = 1
"#
    )
}

/// The keyed token the gateway gives `value` of attribute `field` under the
/// pseudonymization key in the file `key` (as the privacy stage computes it).
pub fn token(key: &Path, field: &str, value: &str) -> String {
    let privacy = outpost::privacy::Privacy::new(&outpost::privacy::PrivacyConfig {
        allow_attrs: vec![field.to_string()],
        pseudonymize_attrs: vec![field.to_string()],
        key: Some(outpost::secret::SecretSource {
            file: Some(key.to_path_buf()),
            env: None,
        }),
        ..Default::default()
    })
    .expect("a readable pseudonymization key");
    privacy
        .token(field, value)
        .expect("a key is loaded: a token")
}

/// A throwaway PKI made with the `openssl` command: a CA, a server
/// certificate for `localhost`/127.0.0.1 and a client certificate.
pub struct Pki {
    /// Directory holding `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`.
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// Make the CA and both certificates.
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl must be installed: run scripts/setup.sh");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=outpost test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
        for (name, ext) in [
            (
                "server",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
            ),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ]);
            std::fs::write(d.join(format!("{name}.ext")), ext).expect("write ext");
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        // Mosquitto started as root reads its certificates after dropping to
        // the `mosquitto` user: make this throwaway PKI readable to it.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755));
        for entry in std::fs::read_dir(d).expect("read pki dir").flatten() {
            let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644));
        }
        Pki { dir }
    }

    /// Path of a file of the PKI.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

fn write_config(path: &Path, config: &str, metrics_port: u16) {
    std::fs::write(
        path,
        format!("{config}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\nlog_interval_s = 0\n"),
    )
    .expect("write config");
}

/// The Modbus device process (`src/bin/modbus-device.rs`) on a Modbus TCP
/// port and an RTU-over-TCP port; killed on drop.
pub struct ModbusDevice {
    child: Child,
    /// Modbus TCP port.
    pub tcp: u16,
    /// RTU framing over TCP port.
    pub rtu: u16,
}

impl ModbusDevice {
    /// Start it and wait until it listens.
    pub fn start() -> ModbusDevice {
        let (tcp, rtu) = (free_port(), free_port());
        let mut child = Command::new(bin("modbus-device"))
            .args([tcp.to_string(), rtu.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start modbus-device");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read modbus-device output");
        assert_eq!(line.trim(), "ready");
        ModbusDevice { child, tcp, rtu }
    }

    /// Send it a signal (SIGSTOP: it stops answering; SIGCONT).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with the pid of a child we own.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for ModbusDevice {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A size-limited tmpfs, unmounted on drop.
pub struct SmallFs {
    /// Its mount point.
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mount one of `size` (as tmpfs takes it: `2m`); needs root.
    pub fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("mount(8) runs");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { path, _dir: dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// KiB used on the file system holding `path`.
pub fn used_kib(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-k", "--output=used"])
        .arg(path)
        .output()
        .expect("df runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

/// What `dir` holds, file by file (`du -ab`).
pub fn du(dir: &Path) -> String {
    let out = Command::new("du")
        .args(["-ab"])
        .arg(dir)
        .output()
        .expect("du runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl SmallFs {
    /// Take every byte left with a file named `name`, which is returned.
    pub fn fill(&self, name: &str) -> PathBuf {
        let filler = self.path.join(name);
        let mut f = std::fs::File::create(&filler).expect("filler file");
        let block = vec![7u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

/// The benchmark input: `sensors` sensors, each replaying BasicMotions
/// series one after the other at 10 Hz (the dataset's rate) for
/// `per_sensor` readings, as JSON Lines. Returns the number of readings.
pub fn write_benchmark_input(path: &Path, sensors: usize, per_sensor: usize) -> usize {
    let ds = workspace().join(".cache/datasets/BasicMotions");
    let mut series = load_ts_series(&ds.join("BasicMotions_TRAIN.ts"));
    series.extend(load_ts_series(&ds.join("BasicMotions_TEST.ts")));
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create input"));
    let base = 1_700_000_000_000i64;
    let mut n = 0;
    for s in 0..sensors {
        let sensor = format!("sensor-{s:02}");
        let mut t = 0;
        let mut k = s;
        while t < per_sensor {
            let chans = &series[k % series.len()].1;
            for i in 0..chans[0].len() {
                if t == per_sensor {
                    break;
                }
                let values: Vec<f32> = chans.iter().map(|c| c[i]).collect();
                writeln!(out, "{}", reading(&sensor, base + t as i64 * 100, &values))
                    .expect("write input");
                t += 1;
                n += 1;
            }
            k += 7;
        }
    }
    out.flush().expect("flush input");
    n
}

/// Peak resident memory (VmHWM) of process `pid` in KiB, 0 if unknown.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM")
}

/// A KiB figure of `/proc/<pid>/status` (`VmHWM`, `RssAnon` ...), 0 if unknown.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.split(':').next() == Some(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
