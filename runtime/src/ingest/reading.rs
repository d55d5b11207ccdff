//! The reading type and its wire formats, with validation. Every rejected
//! reading has a [`RejectReason`] that is counted; nothing here panics on input.
//!
//! JSON payload: one reading or an array of them:
//! `{"sensor":"pump-7","ts":1732300000123,"values":[0.1,0.2,0.3],"attrs":{"line":"A"}}`;
//! `ts` in milliseconds since the epoch or an RFC 3339 string; `values` one
//! number per channel.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// One validated sensor reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Sensor id.
    pub sensor: Arc<str>,
    /// Event time, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// One value per channel, all finite.
    pub values: Vec<f32>,
    /// Attributes (strings, numbers, booleans), filtered by the privacy policy.
    pub attrs: BTreeMap<String, Value>,
    /// Ingest journal sequence number (0: not journaled).
    pub seq: u64,
    /// The acknowledgement owed to the source for this reading's message.
    pub ack: Option<crate::ingest::ack::Ack>,
}

/// Why a reading was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The payload is larger than `ingest.max_payload_bytes`.
    PayloadTooLarge,
    /// The payload is not JSON (or a CSV line does not parse).
    Malformed,
    /// A field is missing or has the wrong type.
    InvalidField,
    /// The number of values differs from the model's channels.
    WrongChannels,
    /// A value is NaN or infinite (or null).
    NonFinite,
    /// The timestamp is unparsable or before the epoch.
    InvalidTimestamp,
    /// The timestamp is further in the future than allowed.
    FutureTimestamp,
    /// The sensor is not in `ingest.sensors`.
    UnknownSensor,
    /// The timestamp is far ahead of the rest of the sensor's group
    /// (`aggregation.max_skew_ms`): its clock is wrong.
    ClockSkew,
    /// A new sensor while `ingest.max_sensors` sensors are tracked.
    TooManySensors,
}

impl RejectReason {
    /// Every reason, for metrics and tests.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::PayloadTooLarge,
        RejectReason::Malformed,
        RejectReason::InvalidField,
        RejectReason::WrongChannels,
        RejectReason::NonFinite,
        RejectReason::InvalidTimestamp,
        RejectReason::FutureTimestamp,
        RejectReason::UnknownSensor,
        RejectReason::ClockSkew,
        RejectReason::TooManySensors,
    ];

    /// Label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::PayloadTooLarge => "payload_too_large",
            RejectReason::Malformed => "malformed",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::WrongChannels => "wrong_channels",
            RejectReason::NonFinite => "non_finite",
            RejectReason::InvalidTimestamp => "invalid_timestamp",
            RejectReason::FutureTimestamp => "future_timestamp",
            RejectReason::UnknownSensor => "unknown_sensor",
            RejectReason::ClockSkew => "clock_skew",
            RejectReason::TooManySensors => "too_many_sensors",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused reading: why, and a short description for the (rate-limited) log.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Why.
    pub reason: RejectReason,
    /// What exactly (never the payload itself: it may carry personal data).
    pub detail: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// A well-formed JSON reading, as the fast path of
/// [`Validator::decode_json`] takes it: integer `ts`, numeric `values`,
/// `attrs` an object or null; unknown keys ignored, as by the general path.
#[derive(serde::Deserialize)]
struct FastReading {
    #[serde(default)]
    sensor: Option<serde_json::Value>,
    ts: i64,
    values: Vec<f32>,
    #[serde(default)]
    attrs: Option<serde_json::Map<String, Value>>,
}

impl FastReading {
    /// The reading; `None` where the general path must decide (a sensor
    /// that is missing or not a string, without an override).
    fn into_reading(self, sensor_override: Option<&str>) -> Option<Reading> {
        let sensor: Arc<str> = match (sensor_override, self.sensor) {
            (Some(s), _) => Arc::from(s),
            (None, Some(Value::String(s))) => Arc::from(s),
            (None, _) => return None,
        };
        Some(Reading {
            sensor,
            ts_ms: self.ts,
            values: self.values,
            attrs: self
                .attrs
                .map(|m| m.into_iter().collect())
                .unwrap_or_default(),
            seq: 0,
            ack: None,
        })
    }
}

/// The checks every reading passes, whatever its source.
#[derive(Debug, Clone)]
pub struct Validator {
    /// Values per reading.
    pub channels: usize,
    /// Largest payload.
    pub max_payload_bytes: usize,
    /// Allowed clock skew into the future.
    pub max_future_ms: i64,
    /// Known sensors (empty: any).
    pub sensors: Vec<String>,
}

impl Validator {
    /// Decode a JSON payload (one reading or an array). `sensor_override`
    /// replaces the payload's `sensor` (taken from the topic). Each element is
    /// accepted or rejected on its own.
    pub fn decode_json(
        &self,
        payload: &[u8],
        sensor_override: Option<&str>,
        now_ms: i64,
    ) -> Vec<Result<Reading, Rejection>> {
        if payload.len() > self.max_payload_bytes {
            return vec![Err(Rejection::new(
                RejectReason::PayloadTooLarge,
                format!("{} bytes > {}", payload.len(), self.max_payload_bytes),
            ))];
        }
        // Fast path: well-formed readings straight into their types, with no
        // intermediate `Value` tree (the profile in BENCHMARKS.md). Anything
        // it does not take (a string timestamp, a bad field, ...) goes the
        // general way below, which gives the precise rejection; both accept
        // exactly the same readings (`the_fast_path_accepts_what_the_general_one_does`).
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => {
                if let Some(r) = serde_json::from_slice::<FastReading>(payload)
                    .ok()
                    .and_then(|r| r.into_reading(sensor_override))
                {
                    return vec![self.check(r, now_ms)];
                }
            }
            Some(b'[') => {
                if let Some(rs) = serde_json::from_slice::<Vec<FastReading>>(payload)
                    .ok()
                    .and_then(|rs| {
                        rs.into_iter()
                            .map(|r| r.into_reading(sensor_override))
                            .collect::<Option<Vec<_>>>()
                    })
                {
                    return rs.into_iter().map(|r| self.check(r, now_ms)).collect();
                }
            }
            _ => {}
        }
        self.decode_json_general(payload, sensor_override, now_ms)
    }

    /// [`Validator::decode_json`] through a `Value` tree: every reading,
    /// each rejection with its precise reason.
    fn decode_json_general(
        &self,
        payload: &[u8],
        sensor_override: Option<&str>,
        now_ms: i64,
    ) -> Vec<Result<Reading, Rejection>> {
        let value: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                return vec![Err(Rejection::new(
                    RejectReason::Malformed,
                    format!("invalid JSON at line {} column {}", e.line(), e.column()),
                ))];
            }
        };
        match value {
            Value::Array(items) => items
                .into_iter()
                .map(|v| self.reading_from_value(v, sensor_override, now_ms))
                .collect(),
            v => vec![self.reading_from_value(v, sensor_override, now_ms)],
        }
    }

    fn reading_from_value(
        &self,
        v: Value,
        sensor_override: Option<&str>,
        now_ms: i64,
    ) -> Result<Reading, Rejection> {
        let Value::Object(mut obj) = v else {
            return Err(Rejection::new(
                RejectReason::InvalidField,
                "a reading must be a JSON object",
            ));
        };
        let sensor = match (sensor_override, obj.remove("sensor")) {
            (Some(s), _) => s.to_string(),
            (None, Some(Value::String(s))) => s,
            (None, Some(_)) => {
                return Err(Rejection::new(
                    RejectReason::InvalidField,
                    "sensor must be a string",
                ));
            }
            (None, None) => {
                return Err(Rejection::new(
                    RejectReason::InvalidField,
                    "sensor is missing",
                ));
            }
        };
        let ts_ms = match obj.remove("ts") {
            Some(Value::Number(n)) => match n.as_i64() {
                Some(t) => t,
                None => {
                    return Err(Rejection::new(
                        RejectReason::InvalidTimestamp,
                        "ts must be integer milliseconds since the epoch",
                    ));
                }
            },
            Some(Value::String(s)) => parse_ts(&s).ok_or_else(|| {
                Rejection::new(RejectReason::InvalidTimestamp, "ts is not RFC 3339")
            })?,
            Some(_) => {
                return Err(Rejection::new(
                    RejectReason::InvalidTimestamp,
                    "ts must be a number or an RFC 3339 string",
                ));
            }
            None => return Err(Rejection::new(RejectReason::InvalidField, "ts is missing")),
        };
        let values = match obj.remove("values") {
            Some(Value::Array(vs)) => {
                let mut out = Vec::with_capacity(vs.len());
                for (i, v) in vs.iter().enumerate() {
                    out.push(json_number(v).ok_or_else(|| {
                        Rejection::new(
                            RejectReason::NonFinite,
                            format!("values[{i}] is not a finite number"),
                        )
                    })?);
                }
                out
            }
            Some(_) => {
                return Err(Rejection::new(
                    RejectReason::InvalidField,
                    "values must be an array of numbers",
                ));
            }
            None => {
                return Err(Rejection::new(
                    RejectReason::InvalidField,
                    "values is missing",
                ));
            }
        };
        let attrs = match obj.remove("attrs") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(m)) => m.into_iter().collect(),
            Some(_) => {
                return Err(Rejection::new(
                    RejectReason::InvalidField,
                    "attrs must be an object",
                ));
            }
        };
        self.check(
            Reading {
                sensor: Arc::from(sensor),
                ts_ms,
                values,
                attrs,
                seq: 0,
                ack: None,
            },
            now_ms,
        )
    }

    /// The checks shared by every source: channels, finiteness, time, sensor.
    pub fn check(&self, r: Reading, now_ms: i64) -> Result<Reading, Rejection> {
        if r.sensor.is_empty() || r.sensor.len() > 256 {
            return Err(Rejection::new(
                RejectReason::InvalidField,
                "sensor must be 1 to 256 bytes",
            ));
        }
        if r.values.len() != self.channels {
            return Err(Rejection::new(
                RejectReason::WrongChannels,
                format!(
                    "{} values, the model expects {}",
                    r.values.len(),
                    self.channels
                ),
            ));
        }
        if let Some(i) = r.values.iter().position(|v| !v.is_finite()) {
            return Err(Rejection::new(
                RejectReason::NonFinite,
                format!("values[{i}] is not finite"),
            ));
        }
        if r.ts_ms < 0 {
            return Err(Rejection::new(
                RejectReason::InvalidTimestamp,
                "ts is before the epoch",
            ));
        }
        // A gateway whose clock is not set (it booted at 1970 without NTP)
        // cannot tell the future: its sensors' clocks are trusted until it
        // can, and aggregation holds back a sensor far ahead of its group.
        if crate::clock::is_set(now_ms) && r.ts_ms > now_ms.saturating_add(self.max_future_ms) {
            return Err(Rejection::new(
                RejectReason::FutureTimestamp,
                format!("ts is {} ms in the future", r.ts_ms - now_ms),
            ));
        }
        if !self.sensors.is_empty() && !self.sensors.iter().any(|s| **s == *r.sensor) {
            return Err(Rejection::new(
                RejectReason::UnknownSensor,
                // Not the id itself: sensor ids may identify a person, and
                // logs are not pseudonymized.
                format!(
                    "the sensor ({} characters) is not in ingest.sensors",
                    r.sensor.chars().count()
                ),
            ));
        }
        Ok(r)
    }
}

/// A JSON value as a finite f32: numbers, or the strings serializers emit for
/// non-finite floats (which are then refused as non-finite by the caller).
fn json_number(v: &Value) -> Option<f32> {
    let x = match v {
        Value::Number(n) => n.as_f64()? as f32,
        _ => return None,
    };
    x.is_finite().then_some(x)
}

/// Parse an RFC 3339 timestamp, or integer milliseconds given as a string.
pub fn parse_ts(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// A CSV header: which columns are the sensor, the time, values and attributes.
#[derive(Debug, Clone)]
pub struct CsvLayout {
    sensor: usize,
    ts: usize,
    values: Vec<usize>,
    attrs: Vec<(usize, String)>,
    columns: usize,
}

impl CsvLayout {
    /// Read a header row: `sensor`, `ts`, any `attr.<name>` columns, and every
    /// other column a value channel in order.
    pub fn from_header(header: &str) -> Result<Self, String> {
        let cols: Vec<&str> = header
            .trim_end_matches(['\r', '\n'])
            .split(',')
            .map(str::trim)
            .collect();
        let find = |name: &str| cols.iter().position(|c| *c == name);
        let sensor = find("sensor").ok_or("CSV header has no `sensor` column")?;
        let ts = find("ts").ok_or("CSV header has no `ts` column")?;
        let mut values = Vec::new();
        let mut attrs = Vec::new();
        for (i, c) in cols.iter().enumerate() {
            if i == sensor || i == ts {
                continue;
            }
            match c.strip_prefix("attr.") {
                Some(a) => attrs.push((i, a.to_string())),
                None => values.push(i),
            }
        }
        Ok(Self {
            sensor,
            ts,
            values,
            attrs,
            columns: cols.len(),
        })
    }

    /// Decode one CSV data line.
    pub fn decode(&self, v: &Validator, line: &str, now_ms: i64) -> Result<Reading, Rejection> {
        if line.len() > v.max_payload_bytes {
            return Err(Rejection::new(
                RejectReason::PayloadTooLarge,
                format!("{} bytes > {}", line.len(), v.max_payload_bytes),
            ));
        }
        let fields: Vec<&str> = line.trim_end_matches(['\r', '\n']).split(',').collect();
        if fields.len() != self.columns {
            return Err(Rejection::new(
                RejectReason::Malformed,
                format!("{} fields, the header has {}", fields.len(), self.columns),
            ));
        }
        let ts_ms = parse_ts(fields[self.ts])
            .ok_or_else(|| Rejection::new(RejectReason::InvalidTimestamp, "ts does not parse"))?;
        let mut values = Vec::with_capacity(self.values.len());
        for &i in &self.values {
            let x: f32 = fields[i].trim().parse().map_err(|_| {
                Rejection::new(
                    RejectReason::Malformed,
                    format!("column {i} is not a number"),
                )
            })?;
            values.push(x);
        }
        let attrs = self
            .attrs
            .iter()
            .map(|(i, name)| (name.clone(), Value::String(fields[*i].trim().to_string())))
            .collect();
        v.check(
            Reading {
                sensor: Arc::from(fields[self.sensor].trim()),
                ts_ms,
                values,
                attrs,
                seq: 0,
                ack: None,
            },
            now_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Validator {
        Validator {
            channels: 3,
            max_payload_bytes: 1000,
            max_future_ms: 60_000,
            sensors: vec![],
        }
    }

    const NOW: i64 = 1_732_300_000_000;

    #[test]
    fn one_and_many() {
        let one =
            br#"{"sensor":"p","ts":1732300000123,"values":[0.1,0.2,0.3],"attrs":{"line":"A"}}"#;
        let r = v().decode_json(one, None, NOW);
        assert_eq!(r.len(), 1);
        let r = r[0].as_ref().unwrap();
        assert_eq!(&*r.sensor, "p");
        assert_eq!(r.attrs["line"], Value::String("A".into()));
        let many = br#"[{"sensor":"p","ts":"2024-11-22T18:26:40.123Z","values":[1,2,3]},{"sensor":"q","ts":1,"values":[1,2]}]"#;
        let r = v().decode_json(many, None, NOW);
        assert_eq!(r[0].as_ref().unwrap().ts_ms, 1_732_300_000_123);
        assert_eq!(
            r[1].as_ref().unwrap_err().reason,
            RejectReason::WrongChannels
        );
    }

    /// The fast path and the general one agree on every payload: same
    /// readings accepted, same reasons for the rest.
    #[test]
    fn the_fast_path_accepts_what_the_general_one_does() {
        let payloads: &[&[u8]] = &[
            br#"{"sensor":"p","ts":1732300000123,"values":[0.1,0.2,0.3],"attrs":{"line":"A"}}"#,
            br#"  {"sensor":"p","ts":1,"values":[1,2,3],"attrs":null,"extra":5}"#,
            br#"{"ts":1,"values":[1,2,3]}"#,
            br#"{"sensor":7,"ts":1,"values":[1,2,3]}"#,
            br#"{"sensor":"p","ts":1.5,"values":[1,2,3]}"#,
            br#"{"sensor":"p","ts":"2024-11-22T18:26:40.123Z","values":[1,2,3]}"#,
            br#"{"sensor":"p","ts":1,"values":[1,null,3]}"#,
            br#"{"sensor":"p","ts":1,"values":[1,1e39,3]}"#,
            br#"{"sensor":"p","ts":1,"values":[1,"NaN",3]}"#,
            br#"{"sensor":"p","ts":1,"values":[1,2]}"#,
            br#"{"sensor":"p","ts":-5,"values":[1,2,3]}"#,
            br#"{"sensor":"p","ts":99999999999999,"values":[1,2,3]}"#,
            br#"{"sensor":"","ts":1,"values":[1,2,3]}"#,
            br#"{"sensor":"p","ts":1,"values":[1,2,3],"attrs":[1]}"#,
            br#"{"sensor":"p","sensor":"q","ts":1,"values":[1,2,3]}"#,
            br#"[{"sensor":"p","ts":1,"values":[1,2,3]},{"sensor":"q","ts":2,"values":[4,5,6]}]"#,
            br#"[{"sensor":"p","ts":1,"values":[1,2,3]},{"ts":2,"values":[4,5,6]}]"#,
            br#"[]"#,
            br#"7"#,
        ];
        let key = |r: &Result<Reading, Rejection>| match r {
            Ok(r) => format!("ok {} {} {:?} {:?}", r.sensor, r.ts_ms, r.values, r.attrs),
            Err(e) => format!("err {:?}", e.reason),
        };
        for p in payloads {
            for sensor in [None, Some("topic-sensor")] {
                let fast: Vec<String> = v().decode_json(p, sensor, NOW).iter().map(key).collect();
                let general: Vec<String> = v()
                    .decode_json_general(p, sensor, NOW)
                    .iter()
                    .map(key)
                    .collect();
                assert_eq!(fast, general, "{}", String::from_utf8_lossy(p));
            }
        }
    }

    #[test]
    fn each_reason() {
        let cases: Vec<(&[u8], RejectReason)> = vec![
            (b"{not json", RejectReason::Malformed),
            (br#"{"ts":1,"values":[1,2,3]}"#, RejectReason::InvalidField),
            (
                br#"{"sensor":"p","ts":1,"values":[1,2]}"#,
                RejectReason::WrongChannels,
            ),
            (
                br#"{"sensor":"p","ts":1,"values":[1,null,3]}"#,
                RejectReason::NonFinite,
            ),
            (
                br#"{"sensor":"p","ts":1,"values":[1,1e39,3]}"#,
                RejectReason::NonFinite,
            ),
            (
                br#"{"sensor":"p","ts":"yesterday","values":[1,2,3]}"#,
                RejectReason::InvalidTimestamp,
            ),
            (
                br#"{"sensor":"p","ts":99999999999999,"values":[1,2,3]}"#,
                RejectReason::FutureTimestamp,
            ),
        ];
        for (payload, reason) in cases {
            let r = v().decode_json(payload, None, NOW);
            assert_eq!(
                r[0].as_ref().unwrap_err().reason,
                reason,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        let big = vec![b' '; 2000];
        assert_eq!(
            v().decode_json(&big, None, NOW)[0]
                .as_ref()
                .unwrap_err()
                .reason,
            RejectReason::PayloadTooLarge
        );
        let mut known = v();
        known.sensors = vec!["a".into()];
        let r = known.decode_json(br#"{"sensor":"b","ts":1,"values":[1,2,3]}"#, None, NOW);
        assert_eq!(
            r[0].as_ref().unwrap_err().reason,
            RejectReason::UnknownSensor
        );
    }

    /// A gateway booted at 1970 (no NTP yet) cannot judge the future: a
    /// reading from a sensor with a set clock is taken, not refused.
    #[test]
    fn an_unset_gateway_clock_refuses_no_reading_as_future() {
        let payload = br#"{"sensor":"p","ts":1732300000123,"values":[1,2,3]}"#;
        let at_1970 = 3_600_000;
        assert!(v().decode_json(payload, None, at_1970)[0].is_ok());
        let far = br#"{"sensor":"p","ts":99999999999999,"values":[1,2,3]}"#;
        assert!(v().decode_json(far, None, at_1970)[0].is_ok());
        assert_eq!(
            v().decode_json(far, None, NOW)[0]
                .as_ref()
                .unwrap_err()
                .reason,
            RejectReason::FutureTimestamp
        );
    }

    #[test]
    fn sensor_from_topic_overrides_payload() {
        let r = v().decode_json(br#"{"ts":5,"values":[1,2,3]}"#, Some("t-1"), NOW);
        assert_eq!(&*r[0].as_ref().unwrap().sensor, "t-1");
    }

    #[test]
    fn csv_lines() {
        let layout = CsvLayout::from_header("sensor,ts,x,y,z,attr.line").unwrap();
        let r = layout.decode(&v(), "s1,1000,1,2,3,L1", NOW).unwrap();
        assert_eq!(r.values, vec![1.0, 2.0, 3.0]);
        assert_eq!(r.attrs["line"], Value::String("L1".into()));
        assert_eq!(
            layout
                .decode(&v(), "s1,1000,1,NaN,3,L1", NOW)
                .unwrap_err()
                .reason,
            RejectReason::NonFinite
        );
        assert_eq!(
            layout
                .decode(&v(), "s1,1000,1,3,L1", NOW)
                .unwrap_err()
                .reason,
            RejectReason::Malformed
        );
        assert!(CsvLayout::from_header("a,b").is_err());
    }
}
