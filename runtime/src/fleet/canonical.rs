//! The bytes a fleet signature covers.
//!
//! For a document (desired state or command) received as JSON:
//!
//! 1. parse it as a JSON object and remove its top-level `signatures` key;
//! 2. write what remains as canonical JSON: no whitespace; object keys
//!    sorted by their UTF-8 bytes, at every depth; arrays in their order;
//!    strings escaped as `serde_json` escapes them (`"` `\\` and control
//!    characters; `\n`, `\r`, `\t`, `\b`, `\f` by name, others as `\u00XX`;
//!    everything else as raw UTF-8); integers in decimal; other numbers as
//!    `serde_json` writes an `f64` (shortest form that reads back the same);
//! 3. prefix the context line of its kind: `outpost-fleet/1 desired\n` or
//!    `outpost-fleet/1 command\n`.
//!
//! The signature is an ed25519 signature over those bytes, in the format of
//! a model's `manifest.sig` (`{"algorithm":"ed25519","key_id":…,
//! "signature":…}`), listed in `signatures`. The context line keeps a
//! signature of one kind from being valid for the other, and from ever
//! being valid for a model manifest (whose first byte is `{`). The gateway
//! verifies what it then interprets: the canonical form of the very JSON
//! value it reads the document from.

use outpost_models::signing::{SignatureFile, SigningKey};
use serde_json::{Map, Value};

/// What a signature is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A desired-state document.
    Desired,
    /// A command.
    Command,
}

impl Kind {
    /// Its context line, the first bytes signed.
    pub fn context(self) -> &'static str {
        match self {
            Kind::Desired => "outpost-fleet/1 desired\n",
            Kind::Command => "outpost-fleet/1 command\n",
        }
    }
}

/// Append `v` as canonical JSON to `out`.
pub fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(&Value::String(k.clone()), out);
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        // Scalars as serde_json writes them (no whitespace inside).
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The signed bytes of `doc` (a JSON object; its `signatures` are left out).
pub fn signed_bytes(kind: Kind, doc: &Map<String, Value>) -> Vec<u8> {
    let mut out = String::from(kind.context());
    let mut rest = doc.clone();
    rest.remove("signatures");
    write_canonical(&Value::Object(rest), &mut out);
    out.into_bytes()
}

/// Sign `doc` with `key`: its signature is added to `doc["signatures"]`
/// (created when absent; a `signatures` that is not an array is replaced).
/// The operator's side; the gateway only verifies.
pub fn sign(kind: Kind, doc: &mut Map<String, Value>, key: &SigningKey) -> SignatureFile {
    let sig = outpost_models::signing::sign_bytes(&signed_bytes(kind, doc), key);
    let entry = serde_json::to_value(&sig).expect("a SignatureFile is plain strings");
    match doc.get_mut("signatures") {
        Some(Value::Array(list)) => list.push(entry),
        _ => {
            doc.insert("signatures".into(), Value::Array(vec![entry]));
        }
    }
    sig
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_and_drops_whitespace() {
        let v: Value = serde_json::from_str(
            r#"{ "b": [3, {"z": 1, "a": "x\ny"}], "a": 1.5, "é": null, "B": true }"#,
        )
        .unwrap();
        let mut out = String::new();
        write_canonical(&v, &mut out);
        assert_eq!(
            out,
            r#"{"B":true,"a":1.5,"b":[3,{"a":"x\ny","z":1}],"é":null}"#
        );
    }

    #[test]
    fn signed_bytes_leave_out_the_signatures_and_carry_the_kind() {
        let doc: Map<String, Value> =
            serde_json::from_str(r#"{"version":2,"signatures":[{"x":1}]}"#).unwrap();
        assert_eq!(
            signed_bytes(Kind::Desired, &doc),
            b"outpost-fleet/1 desired\n{\"version\":2}".to_vec()
        );
        assert_eq!(
            signed_bytes(Kind::Command, &doc),
            b"outpost-fleet/1 command\n{\"version\":2}".to_vec()
        );
    }
}
