//! The contract every source kind passes, run against each: simulated,
//! file, MQTT (real Mosquitto), I2C (a simulated ADXL345 on the bus) and
//! Modbus (the test device process). Adding a source means adding it to
//! [`KINDS`].
//!
//! For each kind, through `ingest::run_source` as the pipeline runs it:
//! 1. **backpressure**: with nobody reading its channel, the source counts
//!    no more readings than the channel holds (it waits, or misses slots
//!    and counts them; it never drops a reading it counted);
//! 2. **readings counted**: every reading it delivered is counted under its
//!    name, and nothing else;
//! 3. **clean stop**: asked to stop, it returns within seconds, without an
//!    error;
//! 4. **reload of its settings**: started again with a changed setting, it
//!    runs on it, and the readings of both runs are counted exactly once
//!    (the sources fed a fixed input: file, MQTT with a persistent session,
//!    a limited simulation, deliver exactly that input);
//! 5. **rejects counted by reason**: with a validator that knows none of
//!    its sensors, every reading is refused and counted as
//!    `unknown_sensor`, none delivered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::ingest::file::{FileFormat, FileSourceConfig};
use outpost::ingest::i2c::I2cSourceConfig;
use outpost::ingest::reading::{Reading, Validator};
use outpost::ingest::simulated::SimulatedSourceConfig;
use outpost::ingest::{IngestCtx, SourceConfig};
use outpost::metrics::Metrics;
use outpost_tests::*;
use tokio_util::sync::CancellationToken;

/// Every source kind; the test below runs the contract on each.
const KINDS: [&str; 5] = ["simulated", "file", "mqtt", "i2c", "modbus"];

/// Readings fed to a source with a fixed input, per run.
const N: usize = 40;
/// Capacity of the source's channel.
const CAP: usize = 4;

/// What a source kind needs around it.
struct Env {
    kind: &'static str,
    dir: tempfile::TempDir,
    broker: Option<Broker>,
    device: Option<ModbusDevice>,
}

impl Env {
    fn new(kind: &'static str) -> Env {
        let env = Env {
            kind,
            dir: tempfile::tempdir().unwrap(),
            broker: (kind == "mqtt").then(Broker::start),
            device: (kind == "modbus").then(ModbusDevice::start),
        };
        if let Some(b) = &env.broker {
            open_session(b.port);
        }
        env
    }

    /// Channels of a reading of this source.
    fn channels(&self) -> usize {
        match self.kind {
            "i2c" => 3,
            "modbus" => 2,
            _ => 6,
        }
    }

    /// Whether the source delivers exactly the input it is fed (else it
    /// samples on its own, for as long as it runs).
    fn fixed_input(&self) -> bool {
        matches!(self.kind, "simulated" | "file" | "mqtt")
    }

    /// The source's configuration for run `run` (0 or 1: the second
    /// changes a setting).
    fn config(&self, run: usize) -> SourceConfig {
        let name = "contract".to_string();
        match self.kind {
            "simulated" => SourceConfig::Simulated(SimulatedSourceConfig {
                name,
                sensors: 1,
                rate_hz: 1000.0,
                seed: 7 + run as u64,
                fault_rate: 0.0,
                limit: N as u64,
                realtime: false,
                ..Default::default()
            }),
            "file" => SourceConfig::File(FileSourceConfig {
                name,
                path: self.dir.path().join(format!("readings-{run}.jsonl")),
                format: FileFormat::Jsonl,
            }),
            "mqtt" => {
                let port = self.broker.as_ref().expect("a broker").port;
                let text = format!(
                    "type = \"mqtt\"\nname = \"{name}\"\nbroker = {{ host = \"127.0.0.1\", port = {port} }}\ntopics = [\"sensors/+/data\"]\nsensor_from = \"{}\"\npersistent_session = true\n",
                    // The second run takes the sensor from the payload
                    // (the same name as the topic's).
                    ["topic:1", "payload"][run]
                );
                toml::from_str(&text).expect("an MQTT source table")
            }
            "i2c" => SourceConfig::I2c(I2cSourceConfig {
                name,
                rate_hz: [200.0, 400.0][run],
                ..Default::default()
            }),
            "modbus" => {
                let port = self.device.as_ref().expect("a device").tcp;
                let text = format!(
                    "type = \"modbus\"\nname = \"{name}\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:{port}\"\npoll_interval_ms = {}\n[[registers]]\nname = \"voltage\"\naddress = 0\n[[registers]]\nname = \"status\"\nkind = \"input\"\naddress = 1\n",
                    [5, 10][run]
                );
                toml::from_str(&text).expect("a Modbus source table")
            }
            other => panic!("unknown source kind {other}"),
        }
    }

    /// Feed run `run`'s input (fixed-input kinds): `N` readings.
    fn feed(&self, run: usize) {
        let lines: Vec<String> = (0..N)
            .map(|k| {
                let v = (run * N + k) as f32;
                reading(
                    "s1",
                    now_ms() - 1000 + k as i64,
                    &[v, 0.2, 0.3, 0.4, 0.5, 0.6],
                )
            })
            .collect();
        match self.kind {
            "file" => std::fs::write(
                self.dir.path().join(format!("readings-{run}.jsonl")),
                lines.join("\n") + "\n",
            )
            .unwrap(),
            "mqtt" => {
                let mut p = Publisher::connect(self.broker.as_ref().expect("a broker").port);
                for l in lines {
                    p.publish("sensors/s1/data", l);
                }
                p.flush();
            }
            _ => {}
        }
    }

    /// Run the source on `cfg` until `stop`.
    async fn run(
        &self,
        cfg: SourceConfig,
        ctx: IngestCtx,
        stop: CancellationToken,
    ) -> Result<(), outpost::ingest::IngestError> {
        match cfg {
            SourceConfig::I2c(c) => {
                outpost::ingest::i2c::run_on_bus(FakeAdxl345::default(), c, ctx, stop).await
            }
            cfg => outpost::ingest::run_source(cfg, ctx, "gw-contract".into(), stop).await,
        }
    }
}

/// The registers of an ADXL345 as the driver uses them: DEVID reads 0xE5,
/// DATAX0 gives six bytes of samples (rising), writes are taken.
#[derive(Default)]
struct FakeAdxl345 {
    register: u8,
    samples: u16,
}

impl embedded_hal::i2c::ErrorType for FakeAdxl345 {
    type Error = embedded_hal::i2c::ErrorKind;
}

impl embedded_hal::i2c::I2c for FakeAdxl345 {
    fn transaction(
        &mut self,
        _address: u8,
        operations: &mut [embedded_hal::i2c::Operation<'_>],
    ) -> Result<(), Self::Error> {
        for op in operations {
            match op {
                embedded_hal::i2c::Operation::Write(bytes) => {
                    if let Some(r) = bytes.first() {
                        self.register = *r;
                    }
                }
                embedded_hal::i2c::Operation::Read(buf) => match self.register {
                    0x00 => buf.fill(0xE5),
                    0x32 => {
                        self.samples = self.samples.wrapping_add(1);
                        let s = self.samples.to_le_bytes();
                        for (i, b) in buf.iter_mut().enumerate() {
                            *b = s[i % 2];
                        }
                    }
                    _ => buf.fill(0),
                },
            }
        }
        Ok(())
    }
}

/// The MQTT source's persistent session, made before it first connects, so
/// that the broker keeps what is published before the source runs.
fn open_session(port: u16) {
    let mut o = rumqttc::MqttOptions::new("gw-contract-src-contract", "127.0.0.1", port);
    o.set_clean_session(false);
    let (client, mut connection) = rumqttc::Client::new(o, 10);
    client
        .subscribe("sensors/+/data", rumqttc::QoS::AtLeastOnce)
        .unwrap();
    for event in connection.iter() {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) = event {
            break;
        }
        event.expect("the broker answers");
    }
    client.disconnect().unwrap();
    for event in connection.iter() {
        if event.is_err() {
            break;
        }
    }
}

fn validator(env: &Env, sensors: Vec<String>) -> Arc<Validator> {
    Arc::new(Validator {
        channels: env.channels(),
        max_payload_bytes: 1 << 16,
        max_future_ms: 300_000,
        sensors,
    })
}

async fn feed(env: &Arc<Env>, run: usize) {
    let env = env.clone();
    tokio::task::spawn_blocking(move || env.feed(run))
        .await
        .expect("feeding did not panic");
}

fn counted(m: &Metrics) -> u64 {
    m.readings_total()
}

/// One run: start, check backpressure, read `want` readings (or all of the
/// fixed input and then some time), stop. Returns the readings received.
async fn one_run(env: &Arc<Env>, run: usize, metrics: &Arc<Metrics>) -> Vec<Reading> {
    let (tx, rx) = flume::bounded::<Reading>(CAP);
    let ctx = IngestCtx::new("contract", validator(env, Vec::new()), tx, metrics.clone());
    let stop = CancellationToken::new();
    let before = counted(metrics);
    if env.fixed_input() {
        feed(env, run).await;
    }
    let source = {
        let (cfg, stop, env) = (env.config(run), stop.clone(), env.clone());
        tokio::spawn(async move { env.run(cfg, ctx, stop).await })
    };

    // 1. Backpressure: nobody reads; the channel fills and the source counts
    // no more than it holds.
    let t = Instant::now();
    while rx.len() < CAP {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}: the channel never filled",
            env.kind
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let full_at = counted(metrics) - before;
    assert_eq!(
        full_at, CAP as u64,
        "{}: counted beyond the channel",
        env.kind
    );
    // The source is held: a while later it has still counted no more.
    let held_until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < held_until {
        assert_eq!(
            counted(metrics) - before,
            CAP as u64,
            "{}: counted readings it could not hand on",
            env.kind
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 2. Read: all of a fixed input, or N samples.
    let mut got = Vec::new();
    while got.len() < N {
        let r = tokio::time::timeout(Duration::from_secs(20), rx.recv_async())
            .await
            .unwrap_or_else(|_| panic!("{}: {} of {N} readings", env.kind, got.len()))
            .expect("the source is running");
        got.push(r);
    }

    // 3. Clean stop, while its output is read.
    stop.cancel();
    let drainer = tokio::spawn(async move {
        let mut rest = Vec::new();
        // Ends when the source has ended and dropped its sender.
        while let Ok(r) = rx.recv_async().await {
            rest.push(r);
        }
        rest
    });
    tokio::time::timeout(Duration::from_secs(10), source)
        .await
        .unwrap_or_else(|_| panic!("{}: did not stop within 10 s", env.kind))
        .expect("the source task did not panic")
        .unwrap_or_else(|e| panic!("{}: stopped with an error: {e}", env.kind));
    got.extend(drainer.await.expect("the drain did not panic"));
    assert_eq!(
        counted(metrics) - before,
        got.len() as u64,
        "{}: counted exactly what it delivered",
        env.kind
    );
    got
}

async fn contract(kind: &'static str) {
    // The brokers' and devices' helpers block: off the async workers.
    let env = Arc::new(
        tokio::task::spawn_blocking(move || Env::new(kind))
            .await
            .unwrap(),
    );
    let metrics = Arc::new(Metrics::new());

    let first = one_run(&env, 0, &metrics).await;
    // 4. Again, with a changed setting.
    let second = one_run(&env, 1, &metrics).await;
    if env.fixed_input() {
        assert_eq!(first.len(), N, "{kind}: the first run's input exactly");
        assert_eq!(second.len(), N, "{kind}: the second run's input exactly");
        if kind != "simulated" {
            // Every value once: nothing lost, nothing twice across the restart.
            let mut values: Vec<u32> = first
                .iter()
                .chain(&second)
                .map(|r| r.values[0] as u32)
                .collect();
            values.sort();
            assert_eq!(values, (0..2 * N as u32).collect::<Vec<_>>(), "{kind}");
        }
    }
    assert!(second.iter().all(|r| r.values.len() == env.channels()));

    // 5. Rejects by reason.
    let rejecting = Arc::new(Metrics::new());
    let (tx, rx) = flume::bounded::<Reading>(CAP);
    let ctx = IngestCtx::new(
        "contract",
        validator(&env, vec!["nobody".into()]),
        tx,
        rejecting.clone(),
    );
    if env.fixed_input() {
        feed(&env, 2).await;
    }
    let stop = CancellationToken::new();
    let cfg = match env.config(0) {
        SourceConfig::File(mut f) => {
            f.path = env.dir.path().join("readings-2.jsonl");
            SourceConfig::File(f)
        }
        other => other,
    };
    let source = {
        let (stop, env) = (stop.clone(), env.clone());
        tokio::spawn(async move { env.run(cfg, ctx, stop).await })
    };
    let t = Instant::now();
    while rejecting.rejected_total("unknown_sensor") < N as u64 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{kind}: {} refusals counted",
            rejecting.rejected_total("unknown_sensor")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), source)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("no error");
    assert_eq!(rx.len(), 0, "{kind}: a refused reading was delivered");
    assert_eq!(rejecting.readings_total(), 0, "{kind}");
    assert_eq!(
        rejecting.rejected_all(),
        rejecting.rejected_total("unknown_sensor"),
        "{kind}: every refusal has its reason"
    );
    if env.fixed_input() && kind != "simulated" {
        assert_eq!(
            rejecting.rejected_total("unknown_sensor"),
            N as u64,
            "{kind}"
        );
    }
}

#[test]
fn every_source_kind_keeps_the_source_contract() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for kind in KINDS {
        rt.block_on(contract(kind));
    }
}
