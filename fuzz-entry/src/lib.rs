//! The entry points of Outpost's fuzz targets: one function per parser that
//! takes bytes from outside the gateway (the network, the site, an operator,
//! or a disk that a crash, a bad sector or a hand edit may have damaged).
//!
//! Each function feeds its input to the real parser, the way the gateway
//! does, and returns; it must never panic, whatever the bytes. Errors are the
//! expected outcome of most inputs and are dropped. The cargo-fuzz crate in
//! `fuzz/` calls these from its libFuzzer targets (nightly); the test
//! `tests/replay.rs` of this crate calls the same functions on every input in
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` in the ordinary
//! `cargo test --workspace` (stable), so a crash once found stays fixed.
//! See docs/fuzzing.md.
//!
//! Inputs that describe several files (the stores are directories) are
//! split into parts at [`SEP`]; see [`parts`].

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use outpost::aggregate::Aggregate;
use outpost::ingest::reading::{CsvLayout, Validator};
use outpost_storage::fs::Fs;
use outpost_storage::outbox::{DiskOutbox, DiskSettings, FullPolicy, Outbox, StreamCaps};
use outpost_storage::simdisk::SimDisk;

/// An entry point: takes any bytes, never panics.
pub type Entry = fn(&[u8]);

/// Every target: its name (the file in `fuzz/fuzz_targets/` and the corpus
/// directory) and its entry point.
pub const TARGETS: &[(&str, Entry)] = &[
    ("reading_json", reading_json),
    ("reading_csv", reading_csv),
    ("mqtt_payload", mqtt_payload),
    ("config_toml", config_toml),
    ("model_manifest", model_manifest),
    ("registry_state", registry_state),
    ("outbox_segments", outbox_segments),
    ("outbox_acked", outbox_acked),
    ("audit_log", audit_log),
    ("journal_segments", journal_segments),
    ("modbus_response", modbus_response),
];

/// Separates the files of a multi-file input.
pub const SEP: &[u8] = b"\n\xff--part--\xff\n";

/// `data` cut at every [`SEP`], at most `max` parts (the last keeps the rest).
pub fn parts(data: &[u8], max: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < max {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + SEP.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// Join files into one input (the inverse of [`parts`]).
pub fn join(files: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(SEP);
        }
        out.extend_from_slice(f);
    }
    out
}

/// The gateway's clock during a run: 2024-11-22, set.
const NOW_MS: i64 = 1_732_300_000_000;

fn validator() -> Validator {
    Validator {
        channels: 3,
        max_payload_bytes: 64 * 1024,
        max_future_ms: 300_000,
        sensors: Vec::new(),
    }
}

/// A JSON payload (one reading or an array), as an MQTT message or a JSONL
/// line carries it: `Validator::decode_json`.
pub fn reading_json(data: &[u8]) {
    let v = validator();
    let _ = v.decode_json(data, None, NOW_MS);
    // With a known-sensor list too (a different refusal path).
    let v = Validator {
        sensors: vec!["pump-7".into(), "watch-0".into()],
        ..v
    };
    let _ = v.decode_json(data, None, NOW_MS);
}

/// A CSV file as the file source reads it: the first non-blank line is the
/// header (`CsvLayout::from_header`), each later line a reading
/// (`CsvLayout::decode`).
pub fn reading_csv(data: &[u8]) {
    let v = validator();
    let mut layout: Option<CsvLayout> = None;
    for line in data.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let text = String::from_utf8_lossy(line);
        match &layout {
            None => match CsvLayout::from_header(&text) {
                Ok(l) => layout = Some(l),
                Err(_) => return,
            },
            Some(l) => {
                let _ = l.decode(&v, &text, NOW_MS);
            }
        }
    }
}

/// An MQTT message of the MQTT source: the topic (up to the first NUL byte)
/// names the sensor (`sensor_from`, chosen by the first byte), the rest is
/// the payload: `sensor_from_topic` then `Validator::decode_json`.
pub fn mqtt_payload(data: &[u8]) {
    use outpost::ingest::mqtt::{SensorFrom, sensor_from_topic};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (topic, payload) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    // MQTT topics are UTF-8 (rumqttc refuses others before the source sees them).
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };
    let from = match mode % 5 {
        0 => SensorFrom::Payload,
        n => SensorFrom::TopicLevel(usize::from(n - 1)),
    };
    if let Some(sensor) = sensor_from_topic(&from, topic) {
        let _ = validator().decode_json(payload, sensor.as_deref(), NOW_MS);
    }
}

/// A configuration file: `Config::parse` (TOML, then every section's
/// `check`). `Config::load` refuses a file that is not UTF-8 before parsing.
pub fn config_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = outpost::config::Config::parse(text, "fuzz.toml");
    }
}

/// The temporary directory of the targets that go through code reading
/// real files: made at the first use, removed by [`remove_scratch`].
static SCRATCH: Mutex<Option<tempfile::TempDir>> = Mutex::new(None);

/// A directory in the temporary directory, made when missing.
fn scratch(name: &str) -> PathBuf {
    let mut guard = SCRATCH.lock().unwrap_or_else(|p| p.into_inner());
    let base = guard
        .get_or_insert_with(|| {
            tempfile::Builder::new()
                .prefix("outpost-fuzz-")
                .tempdir()
                .expect("a temporary directory for the fuzz targets")
        })
        .path()
        .join(name);
    std::fs::create_dir_all(&base).expect("a directory in the temporary directory");
    base
}

/// Remove the temporary directory (the replay test, once done; a static
/// is never dropped).
pub fn remove_scratch() {
    let dir = SCRATCH.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(dir);
}

/// A model's `manifest.json` beside the bundled model's weights:
/// `LoadedModel::load_dir` (parse, check, sha256 of each listed file, then
/// the network the manifest describes built from the weights).
pub fn model_manifest(data: &[u8]) {
    use outpost_models::artifact::LoadedModel;
    let dir = scratch("model");
    let weights = dir.join("model.bpk");
    if !weights.exists() {
        std::fs::write(&weights, outpost_models::bundled::WEIGHTS)
            .expect("the bundled weights written to the temporary directory");
    }
    std::fs::write(dir.join("manifest.json"), data)
        .expect("the manifest written to the temporary directory");
    let _ = LoadedModel::load_dir(&dir, &burn::tensor::Device::flex());
}

/// The model registry's `registry.json`: `Registry::state` (JSON, schema),
/// then a change of the state as `outpost model` makes one, written back
/// and read again.
pub fn registry_state(data: &[u8]) {
    use outpost::governance::Registry;
    let dir = scratch("registry");
    let path = dir.join("registry.json");
    std::fs::write(&path, data).expect("registry.json written to the temporary directory");
    let Ok(registry) = Registry::open(&dir) else {
        return;
    };
    let Ok(mut state) = registry.state() else {
        return;
    };
    let _ = state.shadow("fuzz@1.0.0", "cli");
    let _ = state.promote(None, true, "cli");
    let _ = state.rollback("fuzz", "cli");
    let _ = state.end_probation("auto");
    let text = serde_json::to_vec(&state).expect("a registry state serializes");
    std::fs::write(&path, text).expect("registry.json written to the temporary directory");
    let again = registry
        .state()
        .expect("a registry state written by the gateway reads back");
    assert_eq!(again, state, "registry.json round trip");
}

/// A segment's name and content from a part: u64 LE first sequence, then
/// the file's bytes.
fn named(part: &[u8]) -> Option<(u64, &[u8])> {
    let first = u64::from_le_bytes(part.get(..8)?.try_into().ok()?);
    Some((first, &part[8..]))
}

fn seg_path(dir: &Path, first: u64, ext: &str) -> PathBuf {
    dir.join(format!("{first:020}.{ext}"))
}

fn disk_with(files: &[(PathBuf, &[u8])]) -> SimDisk {
    let fs = SimDisk::new(7);
    for (path, bytes) in files {
        if let Some(dir) = path.parent() {
            fs.create_dir_all(dir)
                .expect("a directory on the simulated disk");
        }
        fs.write(path, bytes).expect("a file on the simulated disk");
    }
    fs
}

const OUTBOX_DIR: &str = "/state/outbox";

fn outbox_settings() -> DiskSettings {
    DiskSettings {
        dir: PathBuf::from(OUTBOX_DIR),
        segment_bytes: 4096,
        max_bytes: 16 * 1024,
        policy: FullPolicy::Coarsen,
        protect_oldest: 1,
        stream_caps: StreamCaps {
            default: 8 * 1024,
            per_stream: Default::default(),
        },
    }
}

/// An aggregate as the gateway writes one (from tests/golden).
pub fn sample_aggregate(group: &str, i: i64) -> Aggregate {
    let start = 1_700_000_000_000 + i * 10_000;
    let text = format!(
        r#"{{"schema":2,"id":"{group}-{i}","gateway":"outpost-dev","group":"{group}","window_start":{start},"window_end":{},"partial":false,"readings":100,"late_readings":0,"inferences":1,"sensors":1,"model":{{"name":"basicmotions-fcn","version":"1.0.0"}},"classes":{{"Badminton":0,"Running":0,"Standing":1,"Walking":0}},"score":{{"mean":0.98,"max":0.98,"p95":0.98}},"policy":{{"version":"1"}}}}"#,
        start + 10_000
    );
    serde_json::from_str(&text).expect("the sample aggregate parses")
}

/// Open the outbox the files make, read and acknowledge what it holds,
/// append (enough to roll segments and hit the caps), reopen and read again.
fn exercise_outbox(fs: SimDisk) {
    type Disk = DiskOutbox<Aggregate, SimDisk>;
    let Ok(mut o) = Disk::open_in(fs.clone(), outbox_settings()) else {
        return;
    };
    let mut from = 0;
    let mut n = 0;
    while let Ok(batch) = o.read_from(from, 64) {
        let Some(last) = batch.last() else { break };
        from = last.seq + 1;
        for r in &batch {
            let _ = r.window_end();
            if n % 2 == 0 {
                let _ = o.ack(r.seq);
            }
            n += 1;
        }
        if n > 10_000 {
            break;
        }
    }
    let _ = o.commit();
    for i in 0..24 {
        let _ = o.append(&sample_aggregate(if i % 3 == 0 { "a" } else { "b" }, i));
    }
    let _ = o.commit();
    let _ = o.stats();
    let _ = o.stream_bytes();
    drop(o);
    let Ok(mut o) = Disk::open_in(fs, outbox_settings()) else {
        return;
    };
    let mut from = 0;
    while let Ok(batch) = o.read_from(from, 256) {
        let Some(last) = batch.last() else { break };
        from = last.seq + 1;
        if from > 1_000_000 {
            break;
        }
    }
}

/// The disk outbox's segment files: up to two segments (each part: u64 LE
/// first sequence, then the file) and the first one's `.sum` summary
/// (parts: segment, summary, segment). `DiskOutbox::open_in` (tail
/// recovery, repair, summaries), reads, acknowledgements, appends, reopen.
pub fn outbox_segments(data: &[u8]) {
    let dir = Path::new(OUTBOX_DIR);
    let p = parts(data, 3);
    let mut files: Vec<(PathBuf, &[u8])> = Vec::new();
    let first = p.first().and_then(|b| named(b));
    if let Some((n, b)) = first {
        files.push((seg_path(dir, n, "seg"), b));
        if let Some(sum) = p.get(1) {
            files.push((seg_path(dir, n, "sum"), sum));
        }
    }
    if let Some((n, b)) = p.get(2).and_then(|b| named(b)) {
        files.push((seg_path(dir, n, "seg"), b));
    }
    exercise_outbox(disk_with(&files));
}

/// Segments a real outbox wrote: 40 records in 4 KiB segments (with their
/// summaries). The `outbox_acked` target's fixed part.
pub fn written_outbox() -> &'static [(PathBuf, Vec<u8>)] {
    static FILES: OnceLock<Vec<(PathBuf, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let fs = SimDisk::new(1);
        let mut settings = outbox_settings();
        settings.max_bytes = 1 << 20;
        settings.stream_caps = StreamCaps::default();
        let mut o: DiskOutbox<Aggregate, SimDisk> =
            DiskOutbox::open_in(fs.clone(), settings).expect("an outbox on an empty disk");
        for i in 0..40 {
            o.append(&sample_aggregate(if i % 2 == 0 { "a" } else { "b" }, i))
                .expect("an append to an outbox with room");
        }
        o.commit().expect("a commit on a healthy disk");
        drop(o);
        let mut files: Vec<_> = fs
            .files_under(Path::new(OUTBOX_DIR))
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n != "acked"))
            .map(|p| {
                let b = fs.read(&p).expect("a file just listed");
                (p, b)
            })
            .collect();
        files.sort();
        files
    })
}

/// The disk outbox's `acked` file (acknowledged ranges), beside segments a
/// real outbox wrote: `DiskOutbox::open_in`, reads, acknowledgements,
/// appends, reopen.
pub fn outbox_acked(data: &[u8]) {
    let mut files: Vec<(PathBuf, &[u8])> = written_outbox()
        .iter()
        .map(|(p, b)| (p.clone(), b.as_slice()))
        .collect();
    files.push((Path::new(OUTBOX_DIR).join("acked"), data));
    exercise_outbox(disk_with(&files));
}

const AUDIT_LOG: &str = "/state/audit/audit.log";

/// The audit log and its head file (parts: log, head): `verify_in`, then
/// `AuditLog::open_in` (tail recovery), an append and a commit, and
/// `verify_in` again.
pub fn audit_log(data: &[u8]) {
    use outpost_storage::audit::{AuditLog, verify_in};
    let p = parts(data, 2);
    let log = Path::new(AUDIT_LOG);
    let mut files: Vec<(PathBuf, &[u8])> = vec![(log.to_path_buf(), p[0])];
    if let Some(head) = p.get(1) {
        files.push((PathBuf::from(format!("{AUDIT_LOG}.head")), head));
    }
    let fs = disk_with(&files);
    let _ = verify_in(&fs, log);
    if let Ok(mut a) = AuditLog::open_in(fs.clone(), log) {
        let _ = a.append_at("fuzz", serde_json::json!({"n": 1}), NOW_MS);
        let _ = a.commit();
        let _ = a.head();
        drop(a);
        let _ = verify_in(&fs, log);
    }
}

const JOURNAL_DIR: &str = "/state/journal";

/// The ingest journal's segments (up to three parts, each u64 LE first
/// sequence then the file): `Journal::open_in` (recovery), each recovered
/// reading decoded as replay decodes it and each aggregate to append again
/// parsed; then appends, a commit, the confirmation, and a reopen.
pub fn journal_segments(data: &[u8]) {
    use outpost_storage::journal::{Journal, JournalSettings};
    let dir = Path::new(JOURNAL_DIR);
    let files: Vec<(PathBuf, &[u8])> = parts(data, 3)
        .into_iter()
        .filter_map(named)
        .map(|(n, b)| (seg_path(dir, n, "seg"), b))
        .collect();
    let fs = disk_with(&files);
    let settings = JournalSettings {
        dir: dir.to_path_buf(),
        segment_bytes: 4096,
        max_bytes: 1 << 20,
    };
    let Ok((mut j, rec)) = Journal::open_in(fs.clone(), settings.clone()) else {
        return;
    };
    let mut covers = Vec::new();
    for (seq, body) in &rec.readings {
        if outpost::journal::decode_reading(body).is_some() {
            covers.push(*seq);
        }
    }
    for a in &rec.reappend {
        let _ = serde_json::from_slice::<Aggregate>(a);
    }
    let _ = j.confirm_recovered();
    if let Ok(seq) = j.append_reading(7, b"\x01\x02") {
        covers.push(seq);
    }
    let _ = j.append_done(&covers, Some(b"{}"));
    if let Ok(mark) = j.commit() {
        let _ = j.confirm(mark);
    }
    let _ = j.stats();
    drop(j);
    let _ = Journal::open_in(fs, settings);
}

/// A Modbus device's answers to one poll. The first byte picks the framing
/// (bit 0: TCP or RTU), the second the number of registers, then 4 bytes
/// per register (kind and byte orders, data type, address u16 LE); the map
/// must pass the source's `check`. The rest is the device's answers, one
/// per request: u16 LE length, then the bytes, handed to the client after
/// it sent its request. `Poller::poll_once` over that transport: the
/// framing and PDU decoding of tokio-modbus, then the source's mapping of
/// words to values.
pub fn modbus_response(data: &[u8]) {
    use outpost::ingest::modbus::{
        DataType, ModbusRegister, ModbusSourceConfig, ModbusTransport, Order, Poller, RegisterKind,
    };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&count, mut rest)) = rest.split_first() else {
        return;
    };
    let mut registers = Vec::new();
    for i in 0..usize::from(count % 8) + 1 {
        let Some(r) = rest.get(..4) else { return };
        rest = &rest[4..];
        let kind = match r[0] % 4 {
            0 => RegisterKind::Holding,
            1 => RegisterKind::Input,
            2 => RegisterKind::Coil,
            _ => RegisterKind::Discrete,
        };
        let data_type = if matches!(kind, RegisterKind::Coil | RegisterKind::Discrete) {
            DataType::Bool
        } else {
            [
                DataType::U16,
                DataType::I16,
                DataType::U32,
                DataType::I32,
                DataType::F32,
                DataType::U64,
                DataType::I64,
                DataType::F64,
            ][usize::from(r[1] % 8)]
        };
        let order = |bit: u8| {
            if r[0] & bit != 0 {
                Order::Little
            } else {
                Order::Big
            }
        };
        registers.push(ModbusRegister {
            name: format!("r{i}"),
            address: u16::from_le_bytes([r[2], r[3]]),
            kind,
            data_type,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            byte_order: order(4),
            word_order: order(8),
        });
    }
    let tcp = mode & 1 == 0;
    let cfg = ModbusSourceConfig {
        name: "fuzz".into(),
        transport: if tcp {
            ModbusTransport::Tcp
        } else {
            ModbusTransport::RtuOverTcp
        },
        address: Some("device:502".into()),
        device: None,
        baud_rate: 9600,
        parity: Default::default(),
        stop_bits: 1,
        unit: 1,
        poll_interval_ms: 1000,
        timeout_ms: 1000,
        retries: 0,
        sensor: None,
        registers,
    };
    let mut c = outpost::check::Collector::new();
    cfg.check(&mut c);
    if !c.is_empty() {
        return;
    }
    let mut answers = Vec::new();
    while let Some(len) = rest.get(..2) {
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let body = &rest[2..];
        let take = len.min(body.len());
        answers.push(body[..take].to_vec());
        rest = &body[take..];
    }
    let device = Device {
        answers: answers.into(),
        current: Vec::new(),
        at: 0,
    };
    let slave = tokio_modbus::Slave(1);
    let ctx = if tcp {
        tokio_modbus::client::tcp::attach_slave(device, slave)
    } else {
        tokio_modbus::client::rtu::attach_slave(device, slave)
    };
    let mut poller = Poller::new(cfg);
    poller.attach(ctx);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    // The device answers at once or the stream ends: the timeout never fires.
    let _ = rt.block_on(poller.poll_once());
}

/// A Modbus device that answers each request with the next scripted bytes;
/// the stream ends when they are used up.
#[derive(Debug)]
struct Device {
    answers: std::collections::VecDeque<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl tokio::io::AsyncRead for Device {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let me = &mut *self;
        let n = (me.current.len() - me.at).min(buf.remaining());
        buf.put_slice(&me.current[me.at..me.at + n]);
        me.at += n;
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Device {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        // A request went out: its answer is what the client reads next.
        let me = &mut *self;
        if !buf.is_empty() {
            me.current = me.answers.pop_front().unwrap_or_default();
            me.at = 0;
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
