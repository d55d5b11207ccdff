//! Writes the seed inputs of every fuzz target into `fuzz/seeds/<target>/`
//! (or the directory given as the first argument): real files in the real
//! formats, the stores' files produced by running the storage code on the
//! simulated disk. The committed corpora started from these (then fuzzed
//! and minimized with `cargo fuzz cmin`): see docs/fuzzing.md.
//!
//! `cargo build --workspace --all-targets --features gpu && target/debug/examples/fuzz_seeds`

use std::path::{Path, PathBuf};

use outpost_fuzz_entry::{join, sample_aggregate, written_outbox};
use outpost_storage::fs::Fs;
use outpost_storage::simdisk::SimDisk;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Seeds {
    root: PathBuf,
}

impl Seeds {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).expect("a seed directory");
        std::fs::write(dir.join(name), bytes).expect("a seed file");
    }
}

fn named(first: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = first.to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn first_of(path: &Path) -> u64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("a store file named by its first sequence")
}

fn readings(s: &Seeds) {
    let json: &[(&str, &str)] = &[
        (
            "one",
            r#"{"sensor":"pump-7","ts":1732300000123,"values":[0.1,0.2,0.3],"attrs":{"line":"A"}}"#,
        ),
        (
            "array",
            r#"[{"sensor":"watch-0","ts":1732300000000,"values":[1,2,3]},{"sensor":"watch-1","ts":"2024-11-22T18:26:40.5Z","values":[-1e3,0,2.5e-3],"attrs":null}]"#,
        ),
        (
            "rfc3339",
            r#"{"sensor":"pump-7","ts":"2024-11-22T18:26:40+01:00","values":[1,2,3],"attrs":{"n":1,"ok":true}}"#,
        ),
        (
            "ts_string_ms",
            r#"{"sensor":"s","ts":"1732300000000","values":[1,2,3]}"#,
        ),
        (
            "bad_values",
            r#"{"sensor":"s","ts":1,"values":[1,"NaN",null]}"#,
        ),
        (
            "missing",
            r#"{"ts":1,"values":[1,2,3],"extra":{"deep":[1,[2,[3]]]}}"#,
        ),
        (
            "future",
            r#"{"sensor":"s","ts":9999999999999,"values":[1,2,3]}"#,
        ),
        ("not_object", r#"[1,"a",null,{"sensor":1}]"#),
    ];
    for (name, text) in json {
        s.put("reading_json", name, text.as_bytes());
        let mut m = vec![2u8];
        m.extend_from_slice(b"sensors/pump-7/data\0");
        m.extend_from_slice(text.as_bytes());
        s.put("mqtt_payload", &format!("level1_{name}"), &m);
    }
    let mut m = vec![0u8];
    m.extend_from_slice(b"site/readings\0");
    m.extend_from_slice(json[0].1.as_bytes());
    s.put("mqtt_payload", "payload_sensor", &m);
    let csv: &[(&str, &str)] = &[
        (
            "basic",
            "sensor,ts,x,y,z,attr.line\ns1,1000,1,2,3,L1\ns1,1001,1,NaN,3,L1\ns1,1000,1,3,L1\n",
        ),
        (
            "rfc3339_crlf",
            "ts, sensor ,a,b,c\r\n2024-11-22T18:26:40Z,pump-7,0.5,-1e-3,7\r\n\r\n2024-11-22T18:26:41.250+02:00,pump-7,1,2,3\r\n",
        ),
        ("no_ts", "sensor,a,b\ns,1,2\n"),
    ];
    for (name, text) in csv {
        s.put("reading_csv", name, text.as_bytes());
    }
}

fn configs(s: &Seeds) {
    let repo = repo();
    let mut paths = vec![repo.join("deploy/etc/outpost.toml")];
    let mut examples: Vec<PathBuf> = std::fs::read_dir(repo.join("deploy/examples"))
        .expect("deploy/examples")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    examples.sort();
    paths.extend(examples);
    for p in paths {
        let name = p.file_name().and_then(|n| n.to_str()).expect("a file name");
        s.put(
            "config_toml",
            name,
            &std::fs::read(&p).expect("a sample configuration"),
        );
    }
}

fn models(s: &Seeds) {
    let manifest = outpost_models::bundled::MANIFEST;
    s.put("model_manifest", "bundled", manifest);
    let text = std::str::from_utf8(manifest).expect("a UTF-8 manifest");
    s.put(
        "model_manifest",
        "bundled_channels_9",
        text.replacen("\"channels\": 6", "\"channels\": 9", 1)
            .as_bytes(),
    );
    use outpost::governance::RegistryState;
    let mut state = RegistryState::default();
    s.put(
        "registry_state",
        "new",
        &serde_json::to_vec_pretty(&state).expect("a state"),
    );
    let _ = state.shadow("fcn@1.1.0", "cli");
    let _ = state.promote(None, true, "cli");
    state.generation = 3;
    s.put(
        "registry_state",
        "promoted",
        &serde_json::to_vec_pretty(&state).expect("a state"),
    );
    let _ = state.rollback("anomaly rate", "auto");
    let _ = state.shadow("fcn@1.2.0", "cli");
    s.put(
        "registry_state",
        "rolled_back",
        &serde_json::to_vec_pretty(&state).expect("a state"),
    );
}

fn outbox(s: &Seeds) {
    let files = written_outbox();
    let segs: Vec<&(PathBuf, Vec<u8>)> = files
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    let sum_of = |first: u64| {
        files
            .iter()
            .find(|(p, _)| p.extension().is_some_and(|e| e == "sum") && first_of(p) == first)
            .map(|(_, b)| b.clone())
            .unwrap_or_default()
    };
    let (p0, b0) = segs[0];
    let (p1, b1) = segs[segs.len() - 1];
    let (f0, f1) = (first_of(p0), first_of(p1));
    s.put(
        "outbox_segments",
        "two_segments",
        &join(&[&named(f0, b0), &sum_of(f0), &named(f1, b1)]),
    );
    s.put("outbox_segments", "one_segment", &named(f0, b0));
    // A torn tail and a flipped byte in the middle.
    let torn = &b1[..b1.len() - 7];
    s.put(
        "outbox_segments",
        "torn_tail",
        &join(&[&named(f0, b0), &sum_of(f0), &named(f1, torn)]),
    );
    let mut flipped = b0.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    s.put(
        "outbox_segments",
        "flipped",
        &join(&[&named(f0, &flipped), b"", &named(f1, b1)]),
    );
    // The acked file of a run that acknowledged some records.
    let fs = SimDisk::new(3);
    for (p, b) in files {
        fs.create_dir_all(p.parent().expect("a parent"))
            .expect("a directory");
        fs.write(p, b).expect("a file");
    }
    use outpost_storage::outbox::{DiskOutbox, DiskSettings, FullPolicy, Outbox, StreamCaps};
    let dir = files[0]
        .0
        .parent()
        .expect("the outbox directory")
        .to_path_buf();
    let settings = DiskSettings {
        dir: dir.clone(),
        segment_bytes: 4096,
        max_bytes: 1 << 20,
        policy: FullPolicy::DropOldest,
        protect_oldest: 0,
        stream_caps: StreamCaps::default(),
    };
    let mut o: DiskOutbox<outpost::aggregate::Aggregate, SimDisk> =
        DiskOutbox::open_in(fs.clone(), settings).expect("the written outbox");
    for seq in [1, 2, 3, 5, 8, 9, 20, 21, 22, 30] {
        let _ = o.ack(seq);
    }
    o.commit().expect("a commit");
    s.put(
        "outbox_acked",
        "ranges",
        &fs.read(&dir.join("acked")).expect("an acked file"),
    );
    for seq in 0..60 {
        let _ = o.ack(seq);
    }
    o.commit().expect("a commit");
    s.put(
        "outbox_acked",
        "all",
        &fs.read(&dir.join("acked")).expect("an acked file"),
    );
}

fn audit(s: &Seeds) {
    use outpost_storage::audit::AuditLog;
    let fs = SimDisk::new(4);
    let path = Path::new("/state/audit/audit.log");
    let mut a = AuditLog::open_in(fs.clone(), path).expect("a new audit log");
    a.append_at(
        "model_loaded",
        serde_json::json!({"model": "basicmotions-fcn@1.0.0", "sha256": "ab"}),
        1_700_000_000_000,
    )
    .expect("an append");
    a.commit().expect("a commit");
    a.append_at(
        "published",
        serde_json::json!({"id": "9da2", "n": 1.5, "list": [1, 2]}),
        1_700_000_001_000,
    )
    .expect("an append");
    a.commit().expect("a commit");
    a.append_at("published", serde_json::json!(null), 1_700_000_002_000)
        .expect("an append");
    drop(a);
    let log = fs.read(path).expect("the log");
    let head = fs
        .read(Path::new("/state/audit/audit.log.head"))
        .expect("the head file");
    s.put("audit_log", "committed_and_not", &join(&[&log, &head]));
    s.put("audit_log", "no_head", &log);
    let mut torn = log.clone();
    torn.extend_from_slice(b"{\"seq\":4,\"ts_ms\":1700000003000,\"ki");
    s.put("audit_log", "torn", &join(&[&torn, &head]));
}

/// A reading as the runtime's journal stage encodes it.
fn reading_body(sensor: &str, ts: i64, values: &[f32], attrs: &str) -> Vec<u8> {
    let mut b = ts.to_le_bytes().to_vec();
    b.extend_from_slice(&(sensor.len() as u32).to_le_bytes());
    b.extend_from_slice(sensor.as_bytes());
    b.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for v in values {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(attrs.as_bytes());
    b
}

fn journal(s: &Seeds) {
    use outpost_storage::journal::{Journal, JournalSettings};
    let fs = SimDisk::new(5);
    let dir = PathBuf::from("/state/journal");
    let settings = JournalSettings {
        dir: dir.clone(),
        segment_bytes: 512,
        max_bytes: 1 << 20,
    };
    let (mut j, _) = Journal::open_in(fs.clone(), settings).expect("a new journal");
    let mut seqs = Vec::new();
    for i in 0..12 {
        let attrs = if i % 3 == 0 { r#"{"line":"A"}"# } else { "" };
        let body = reading_body(
            &format!("pump-{}", i % 2),
            1_700_000_000_000 + i,
            &[0.5, -1.0, i as f32],
            attrs,
        );
        seqs.push(j.append_reading(1000 + i as u64, &body).expect("an append"));
        if i % 4 == 3 {
            j.commit().expect("a commit");
        }
    }
    let agg = serde_json::to_vec(&sample_aggregate("pump", 1)).expect("an aggregate");
    j.append_done(&seqs[..4], Some(&agg))
        .expect("a done record");
    let mark = j.commit().expect("a commit");
    j.append_done(&seqs[4..6], None).expect("a done record");
    j.commit().expect("a commit");
    j.confirm(mark).expect("a confirmation");
    drop(j);
    let files: Vec<(u64, Vec<u8>)> = fs
        .files_under(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .map(|p| (first_of(&p), fs.read(&p).expect("a segment")))
        .collect();
    let parts: Vec<Vec<u8>> = files.iter().map(|(n, b)| named(*n, b)).collect();
    let last3: Vec<&[u8]> = parts
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|p| p.as_slice())
        .collect();
    s.put("journal_segments", "segments", &join(&last3));
    s.put("journal_segments", "one", &parts[0]);
    let mut torn = parts[parts.len() - 1].clone();
    torn.truncate(torn.len() - 3);
    s.put("journal_segments", "torn", &torn);
}

fn crc16(b: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for x in b {
        crc ^= u16::from(*x);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// One answer: a PDU in a TCP (MBAP, transaction `tid`) or RTU frame.
fn frame(tcp: bool, tid: u16, pdu: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    if tcp {
        f.extend_from_slice(&tid.to_be_bytes());
        f.extend_from_slice(&0u16.to_be_bytes());
        f.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
        f.push(1);
        f.extend_from_slice(pdu);
    } else {
        f.push(1);
        f.extend_from_slice(pdu);
        let c = crc16(&f);
        f.extend_from_slice(&c.to_le_bytes());
    }
    let mut out = (f.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(&f);
    out
}

fn registers_pdu(function: u8, words: &[u16]) -> Vec<u8> {
    let mut p = vec![function, (words.len() * 2) as u8];
    for w in words {
        p.extend_from_slice(&w.to_be_bytes());
    }
    p
}

fn modbus(s: &Seeds) {
    for tcp in [true, false] {
        let mode = if tcp { 0u8 } else { 1 };
        let t = if tcp { "tcp" } else { "rtu" };
        // One holding u16 at 0.
        let mut one = vec![mode, 0, 0, 0, 0, 0];
        one.extend(frame(tcp, 0, &registers_pdu(3, &[1234])));
        s.put("modbus_response", &format!("{t}_holding_u16"), &one);
        // Holding f32 at 10 (words little), input i64 at 100, coil at 3:
        // three requests.
        let mut three = vec![mode, 2];
        three.extend([0x08, 4, 10, 0]);
        three.extend([0x01, 6, 100, 0]);
        three.extend([0x02, 0, 3, 0]);
        three.extend(frame(tcp, 0, &registers_pdu(3, &[0x4048, 0xf5c3])));
        three.extend(frame(
            tcp,
            1,
            &registers_pdu(4, &[0xffff, 0xffff, 0xffff, 0xfffe]),
        ));
        three.extend(frame(tcp, 2, &[1, 1, 0b1000]));
        s.put("modbus_response", &format!("{t}_three_spans"), &three);
        // An exception answer.
        let mut ex = vec![mode, 0, 1, 0, 0, 0];
        ex.extend(frame(tcp, 0, &[0x84, 0x02]));
        s.put("modbus_response", &format!("{t}_exception"), &ex);
        // Too few words.
        let mut short = vec![mode, 0, 0, 5, 0, 0];
        short.extend(frame(tcp, 0, &registers_pdu(3, &[7])));
        s.put("modbus_response", &format!("{t}_short"), &short);
    }
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("fuzz/seeds"));
    let s = Seeds { root };
    readings(&s);
    configs(&s);
    models(&s);
    outbox(&s);
    audit(&s);
    journal(&s);
    modbus(&s);
    for (target, entry) in outpost_fuzz_entry::TARGETS {
        let dir = s.root.join(target);
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("the target's seeds") {
            let data = std::fs::read(e.expect("an entry").path()).expect("a seed");
            entry(&data);
            n += 1;
        }
        println!("{target}: {n} seeds in {}", dir.display());
    }
}
