//! Redaction: patterns cut out of string values.

use std::collections::BTreeMap;

use regex::{Regex, RegexBuilder};
use serde_json::Value;

use super::PrivacyError;
use crate::privacy::BuiltinPattern;

/// Largest compiled pattern, in bytes.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// The regular expression of a built-in pattern. They err on the side of
/// removing (see the module documentation).
pub(crate) fn builtin_regex(p: BuiltinPattern) -> &'static str {
    match p {
        // local@domain.tld
        BuiltinPattern::Email => {
            r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)+"
        }
        // An optional '+', then at least 7 digits, single separators
        // (space . - / and parentheses) between them: every international
        // and national format, and any other long run of digits.
        BuiltinPattern::Phone => r"\+?\(?[0-9](?:[ ./\-]?[()]?[ ]?[0-9]){6,}",
        // Dotted quad, each part 0 to 255.
        BuiltinPattern::Ipv4 => {
            r"\b(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\b"
        }
        // Country code, check digits, 11 to 30 letters or digits, with
        // optional single spaces (groups of four on paper).
        BuiltinPattern::Iban => r"\b[A-Z]{2}[0-9]{2}(?:[ ]?[A-Z0-9]){11,30}\b",
    }
}

/// Compile a redaction pattern as the privacy stage does; the error is the
/// compiler's message. A pattern that matches the empty string is refused.
pub(crate) fn compile_pattern(pattern: &str) -> Result<Regex, String> {
    let re = RegexBuilder::new(pattern)
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string().replace('\n', " "))?;
    if re.is_match("") {
        return Err("matches the empty string".into());
    }
    Ok(re)
}

/// The patterns of a policy, applied in order: the built-in ones (email,
/// iban, ipv4, phone: the more specific first), then the named ones in name
/// order.
#[derive(Debug, Default)]
pub(super) struct Redactor {
    patterns: Vec<(String, Regex)>,
}

impl Redactor {
    pub(super) fn new(
        builtin: &[BuiltinPattern],
        custom: &BTreeMap<String, String>,
    ) -> Result<Self, PrivacyError> {
        let mut patterns = Vec::new();
        for p in [
            BuiltinPattern::Email,
            BuiltinPattern::Iban,
            BuiltinPattern::Ipv4,
            BuiltinPattern::Phone,
        ] {
            if builtin.contains(&p) {
                let re =
                    compile_pattern(builtin_regex(p)).map_err(|reason| PrivacyError::Pattern {
                        name: p.name().to_string(),
                        reason,
                    })?;
                patterns.push((format!("[redacted:{}]", p.name()), re));
            }
        }
        for (name, pattern) in custom {
            let re = compile_pattern(pattern).map_err(|reason| PrivacyError::Pattern {
                name: name.clone(),
                reason,
            })?;
            patterns.push((format!("[redacted:{name}]"), re));
        }
        Ok(Self { patterns })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Redact every string in `v`, at any depth: string values, and the keys
    /// of objects as well as their values; returns the number of matches
    /// removed. Two keys that redact to the same text are kept apart by a
    /// suffix (`[redacted:email]#2`), so no value is lost.
    pub(super) fn redact_value(&self, v: &mut Value) -> u64 {
        match v {
            Value::String(s) => match self.redact_str(s) {
                Some((out, n)) => {
                    *s = out;
                    n
                }
                None => 0,
            },
            Value::Array(items) => items.iter_mut().map(|i| self.redact_value(i)).sum(),
            Value::Object(m) => {
                let mut total = 0;
                let mut out = serde_json::Map::with_capacity(m.len());
                for (key, mut value) in std::mem::take(m) {
                    total += self.redact_value(&mut value);
                    let key = match self.redact_str(&key) {
                        Some((redacted, n)) => {
                            total += n;
                            let mut unique = redacted.clone();
                            let mut i = 2;
                            while out.contains_key(&unique) {
                                unique = format!("{redacted}#{i}");
                                i += 1;
                            }
                            unique
                        }
                        None => key,
                    };
                    out.insert(key, value);
                }
                *m = out;
                total
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
    }

    /// `s` with every match replaced, and the number of matches; `None`
    /// when nothing matched.
    fn redact_str(&self, s: &str) -> Option<(String, u64)> {
        let mut current: Option<String> = None;
        let mut total = 0;
        for (replacement, re) in &self.patterns {
            let text = current.as_deref().unwrap_or(s);
            let mut out = String::new();
            let mut last = 0;
            let mut n = 0;
            for m in re.find_iter(text) {
                if m.is_empty() {
                    continue;
                }
                out.push_str(&text[last..m.start()]);
                out.push_str(replacement);
                last = m.end();
                n += 1;
            }
            if n > 0 {
                out.push_str(&text[last..]);
                current = Some(out);
                total += n;
            }
        }
        current.map(|c| (c, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(p: BuiltinPattern) -> Redactor {
        Redactor::new(&[p], &BTreeMap::new()).unwrap()
    }

    fn red(r: &Redactor, s: &str) -> String {
        r.redact_str(s)
            .map(|(s, _)| s)
            .unwrap_or_else(|| s.to_string())
    }

    #[test]
    fn builtin_patterns() {
        let phone = only(BuiltinPattern::Phone);
        for p in [
            "+41 44 668 18 00",
            "0044 20 7946 0958",
            "(555) 123-4567",
            "555-123-4567",
            "+1 (555) 123 4567",
            "07700900123",
            "030/1234567",
        ] {
            assert_eq!(red(&phone, p), "[redacted:phone]", "{p}");
        }
        for keep in ["line 7", "12-34", "v1.2.3", "pump-7 ok"] {
            assert_eq!(red(&phone, keep), keep);
        }
        let email = only(BuiltinPattern::Email);
        assert_eq!(
            red(&email, "to: j.doe+x@mail.example.co.uk."),
            "to: [redacted:email]."
        );
        assert_eq!(red(&email, "not an @ address"), "not an @ address");
        let ip = only(BuiltinPattern::Ipv4);
        assert_eq!(red(&ip, "from 10.0.0.255:80"), "from [redacted:ipv4]:80");
        assert_eq!(red(&ip, "v 1.2.3"), "v 1.2.3");
        assert_eq!(red(&ip, "999.1.1.1"), "999.1.1.1");
        let iban = only(BuiltinPattern::Iban);
        assert_eq!(
            red(&iban, "pay GB82 WEST 1234 5698 7654 32 now"),
            "pay [redacted:iban] now"
        );
    }

    #[test]
    fn keys_are_redacted_at_any_depth() {
        let r = only(BuiltinPattern::Email);
        let mut v = serde_json::json!({
            "jane.doe@example.org": 1,
            "a": [{"bob@example.com": {"eve@example.net": "x@example.org"}}],
            "[redacted:email]": 2
        });
        assert_eq!(r.redact_value(&mut v), 4);
        let text = v.to_string();
        assert!(!text.contains('@'), "{text}");
        assert_eq!(
            v["a"][0]["[redacted:email]"]["[redacted:email]"],
            "[redacted:email]"
        );
        // Keys that redact alike are kept apart: no value lost.
        let top = v.as_object().unwrap();
        assert_eq!(top.len(), 3, "{text}");
        assert!(top.contains_key("[redacted:email]#2"), "{text}");
    }

    #[test]
    fn custom_patterns_and_empty_matches() {
        assert_eq!(
            compile_pattern("a*").unwrap_err(),
            "matches the empty string"
        );
        assert!(compile_pattern("(").is_err());
        let r = Redactor::new(&[], &[("id".to_string(), r"\bX[0-9]+".to_string())].into()).unwrap();
        assert_eq!(
            r.redact_str("X1 and X22"),
            Some(("[redacted:id] and [redacted:id]".into(), 2))
        );
        assert_eq!(r.redact_str("none"), None);
        // `$` in a replacement is not an expansion.
        let r = Redactor::new(&[], &[("d$1".to_string(), "q".to_string())].into()).unwrap();
        assert_eq!(red(&r, "aqa"), "a[redacted:d$1]a");
    }
}
