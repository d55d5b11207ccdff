//! Outbox benchmark: Outpost's segment log against SQLite in WAL mode
//! (synchronous NORMAL and FULL), measured in the same run on the same disk.
//!
//! ```sh
//! cargo bench -p outpost-runtime --bench outbox            # 1 GiB backlog
//! OUTPOST_BENCH_BACKLOG_MB=64 cargo bench -p outpost-runtime --bench outbox
//! ```
//!
//! Reported: appends per second with a group commit (fsync) every 100
//! records and with an fsync per record; replay (read + acknowledge) per
//! second; and opening a store that holds a large backlog, with the memory
//! the open took. Results go to BENCHMARKS.md by hand, with this command.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use outpost::aggregate::{AGGREGATE_SCHEMA, Aggregate, ModelRef, PolicyRef, ScoreStats};
use outpost::outbox::{DiskOutbox, DiskSettings, FullPolicy, Outbox};
use rusqlite::{Connection, params};

fn aggregate(i: u64) -> Aggregate {
    let mut classes = BTreeMap::new();
    for (k, c) in ["Badminton", "Running", "Standing", "Walking"]
        .iter()
        .enumerate()
    {
        classes.insert(c.to_string(), (i + k as u64) % 7);
    }
    let mut a = Aggregate {
        schema: AGGREGATE_SCHEMA,
        id: String::new(),
        gateway: "gw-bench-0001".into(),
        group: format!("line-{}", i % 16),
        window_start: 1_700_000_000_000 + i as i64 * 10_000,
        window_end: 1_700_000_010_000 + i as i64 * 10_000,
        partial: false,
        readings: 1000 + i % 13,
        late_readings: i % 3,
        inferences: 19,
        sensors: 4,
        model: ModelRef {
            name: "basicmotions-fcn".into(),
            version: "1.0.0".into(),
        },
        classes: Some(classes),
        anomalies: None,
        anomaly_rate: None,
        score: Some(ScoreStats {
            mean: 0.93,
            max: 0.999,
            p95: 0.997,
        }),
        policy: PolicyRef::default(),
        models: None,
        shadow: None,
        drift: None,
        gap: false,
        covers: Vec::new(),
    };
    a.id = a.compute_id();
    a
}

fn rss_kib() -> u64 {
    outpost::metrics::rss_kib("self").unwrap_or(0)
}

/// The stores under test, behind one small interface.
trait Store {
    fn append(&mut self, a: &Aggregate);
    fn commit(&mut self);
    /// Read up to 256 records from `from`, acknowledge them, commit; returns
    /// the next `from` and how many were read.
    fn drain_chunk(&mut self, from: u64) -> (u64, usize);
}

struct Log(DiskOutbox);

impl Store for Log {
    fn append(&mut self, a: &Aggregate) {
        self.0.append(a).expect("append");
    }
    fn commit(&mut self) {
        self.0.commit().expect("commit");
    }
    fn drain_chunk(&mut self, from: u64) -> (u64, usize) {
        let recs = self.0.read_from(from, 256).expect("read");
        let mut next = from;
        for r in &recs {
            std::hint::black_box(r.payload());
            self.0.ack(r.seq).expect("ack");
            next = r.seq + 1;
        }
        self.0.commit().expect("commit");
        (next, recs.len())
    }
}

fn open_log(dir: &Path) -> Log {
    Log(DiskOutbox::open(DiskSettings {
        dir: dir.to_path_buf(),
        segment_bytes: 8 << 20,
        max_bytes: 4 << 30,
        policy: FullPolicy::RejectNew,
        protect_oldest: 0,
        stream_caps: Default::default(),
    })
    .expect("open log"))
}

struct Sqlite {
    conn: Connection,
    in_tx: bool,
}

fn open_sqlite(path: &Path, synchronous: &str) -> Sqlite {
    let conn = Connection::open(path).expect("open sqlite");
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous};
         CREATE TABLE IF NOT EXISTS outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT, grp TEXT NOT NULL, id TEXT NOT NULL, payload BLOB NOT NULL);"
    ))
    .expect("schema");
    Sqlite { conn, in_tx: false }
}

impl Store for Sqlite {
    fn append(&mut self, a: &Aggregate) {
        if !self.in_tx {
            self.conn.execute_batch("BEGIN").expect("begin");
            self.in_tx = true;
        }
        let payload = serde_json::to_vec(a).expect("json");
        self.conn
            .prepare_cached("INSERT INTO outbox(grp, id, payload) VALUES (?1, ?2, ?3)")
            .expect("prepare")
            .execute(params![a.group, a.id, payload])
            .expect("insert");
    }
    fn commit(&mut self) {
        if self.in_tx {
            self.conn.execute_batch("COMMIT").expect("commit");
            self.in_tx = false;
        }
    }
    fn drain_chunk(&mut self, from: u64) -> (u64, usize) {
        let rows: Vec<(i64, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT seq, payload FROM outbox WHERE seq >= ?1 ORDER BY seq LIMIT 256",
            )
            .expect("prepare")
            .query_map([from as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .map(|r| r.expect("row"))
            .collect();
        self.conn.execute_batch("BEGIN").expect("begin");
        let mut next = from;
        for (seq, payload) in &rows {
            std::hint::black_box(payload);
            self.conn
                .prepare_cached("DELETE FROM outbox WHERE seq = ?1")
                .expect("prepare")
                .execute([seq])
                .expect("delete");
            next = *seq as u64 + 1;
        }
        self.conn.execute_batch("COMMIT").expect("commit");
        (next, rows.len())
    }
}

fn append_rate(store: &mut dyn Store, n: u64, every: u64) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        store.append(&aggregate(i));
        if (i + 1) % every == 0 {
            store.commit();
        }
    }
    store.commit();
    n as f64 / t.elapsed().as_secs_f64()
}

fn replay_rate(store: &mut dyn Store) -> (f64, u64) {
    let t = Instant::now();
    let mut from = 0;
    let mut total = 0u64;
    loop {
        let (next, k) = store.drain_chunk(from);
        if k == 0 {
            break;
        }
        total += k as u64;
        from = next;
    }
    (total as f64 / t.elapsed().as_secs_f64(), total)
}

fn row(name: &str, cells: &[String]) {
    println!("| {name} | {} |", cells.join(" | "));
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let backlog_mb: u64 = std::env::var("OUTPOST_BENCH_BACKLOG_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let n_batch = 50_000u64;
    let n_single = 2_000u64;
    let record = serde_json::to_vec(&aggregate(1)).expect("json").len();
    println!(
        "outbox benchmark: {record}-byte aggregates; {n_batch} appends with a commit every 100, {n_single} with a commit each; backlog {backlog_mb} MiB; temp dir {}\n",
        std::env::temp_dir().display()
    );
    println!(
        "| store | appends/s, fsync per 100 | appends/s, fsync per record | replay (read+ack)/s | open with backlog | RSS growth at open |"
    );
    println!("|---|---|---|---|---|---|");

    type Make = Box<dyn Fn(&Path) -> Box<dyn Store>>;
    let stores: Vec<(&str, Make)> = vec![
        (
            "Outpost segment log",
            Box::new(|d: &Path| Box::new(open_log(&d.join("log"))) as Box<dyn Store>),
        ),
        (
            "SQLite WAL, synchronous=FULL",
            Box::new(|d: &Path| {
                Box::new(open_sqlite(&d.join("full.db"), "FULL")) as Box<dyn Store>
            }),
        ),
        (
            "SQLite WAL, synchronous=NORMAL",
            Box::new(|d: &Path| {
                Box::new(open_sqlite(&d.join("normal.db"), "NORMAL")) as Box<dyn Store>
            }),
        ),
    ];
    for (name, make) in &stores {
        let dir = tempfile::tempdir().expect("temp dir");
        let batch = append_rate(make(dir.path()).as_mut(), n_batch, 100);
        let single = {
            let d2 = tempfile::tempdir().expect("temp dir");
            append_rate(make(d2.path()).as_mut(), n_single, 1)
        };
        let (replay, replayed) = replay_rate(make(dir.path()).as_mut());
        assert_eq!(replayed, n_batch, "{name}: replay saw every record");

        // A large backlog, written in commits of 1000, then reopened.
        let big = tempfile::tempdir().expect("temp dir");
        let count = backlog_mb * 1024 * 1024 / record as u64;
        {
            let mut s = make(big.path());
            for i in 0..count {
                s.append(&aggregate(i));
                if (i + 1) % 1000 == 0 {
                    s.commit();
                }
            }
            s.commit();
        }
        let before = rss_kib();
        let t = Instant::now();
        let mut s = make(big.path());
        // Open and read the first records: what a restarted gateway does first.
        let (_, first) = s.drain_chunk(0);
        let open: Duration = t.elapsed();
        let grew = rss_kib().saturating_sub(before);
        assert_eq!(first, 256);
        drop(s);
        row(
            name,
            &[
                format!("{batch:.0}"),
                format!("{single:.0}"),
                format!("{replay:.0}"),
                format!("{:.1} ms ({count} records)", open.as_secs_f64() * 1e3),
                format!("{grew} KiB"),
            ],
        );
    }
}
