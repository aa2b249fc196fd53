//! The metric record: what a server sends, how it is decoded and validated.
//!
//! The gateway and the job share this module, so a record the gateway accepts is exactly a
//! record the job writes, and a record the job dead-letters carries the same reason the
//! gateway would have given.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Longest serverId accepted, in bytes.
pub const MAX_SERVER_ID_BYTES: usize = 256;

/// One decoded, validated metric report.
///
/// Crosses worker boundaries (timely serializes it with bincode), so it is a plain struct.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub server_id: String,
    /// Microseconds since the Unix epoch (PostgreSQL's own resolution).
    pub time_us: i64,
    pub cpu: Option<f64>,
    pub ram: Option<f64>,
    /// Every other numeric field of the report, in the order it arrived.
    pub extra: Vec<(String, f64)>,
}

/// Why a message could not become a [`Metric`]. The `Display` text is what lands in the
/// dead-letter table; [`DecodeError::kind`] is a short stable label for counters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("message is not valid UTF-8")]
    InvalidUtf8,
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("a record must be a JSON object")]
    NotAnObject,
    #[error("serverId is missing")]
    MissingServerId,
    #[error("serverId is empty")]
    EmptyServerId,
    #[error("serverId is {0} bytes long; the limit is {MAX_SERVER_ID_BYTES}")]
    ServerIdTooLong(usize),
    #[error("field {field:?} must be {expected}, found {found}")]
    WrongType { field: String, expected: &'static str, found: &'static str },
    #[error("field {0:?} is not a finite number")]
    NonFinite(String),
    #[error("record has no numeric metric (cpu, ram or another number)")]
    NoMetrics,
    #[error("bad timestamp: {0}")]
    BadTimestamp(String),
    #[error("timestamp {time} is outside the accepted window ({window})")]
    TimestampOutOfBounds { time: String, window: String },
    #[error("record has no timestamp and the message carries none")]
    MissingTimestamp,
    #[error("message key {key:?} disagrees with the body's serverId {body:?}")]
    KeyMismatch { key: String, body: String },
}

impl DecodeError {
    /// A short, stable label (for metrics and the progress report).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::TooLarge(..) => "too_large",
            DecodeError::InvalidUtf8 => "invalid_utf8",
            DecodeError::MalformedJson(_) => "malformed_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::MissingServerId => "missing_server_id",
            DecodeError::EmptyServerId => "empty_server_id",
            DecodeError::ServerIdTooLong(_) => "server_id_too_long",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::NonFinite(_) => "non_finite",
            DecodeError::NoMetrics => "no_metrics",
            DecodeError::BadTimestamp(_) => "bad_timestamp",
            DecodeError::TimestampOutOfBounds { .. } => "timestamp_out_of_bounds",
            DecodeError::MissingTimestamp => "missing_timestamp",
            DecodeError::KeyMismatch { .. } => "key_mismatch",
        }
    }
}

/// Bounds a record must respect. The defaults accept a year of back-fill and ten minutes
/// of clock skew into the future.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_age: Duration,
    pub max_future: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 * 1024,
            max_age: Duration::from_secs(365 * 24 * 3600),
            max_future: Duration::from_secs(600),
        }
    }
}

/// Decodes and validates one message value.
///
/// `key` is the Kafka message key (the serverId, when the producer set one);
/// `fallback_time_ms` is the Kafka message timestamp, used when the body has no `ts`;
/// `now_ms` anchors the timestamp window.
///
/// ```
/// use fleetflow::record::{decode, Limits};
/// let m = decode(br#"{"serverId":"s17","cpu":45,"ram":60,"disk":3.5}"#, Some(b"s17"),
///                Some(1_700_000_000_000), 1_700_000_000_000, &Limits::default()).unwrap();
/// assert_eq!(m.server_id, "s17");
/// assert_eq!(m.cpu, Some(45.0));
/// assert_eq!(m.extra, vec![("disk".to_string(), 3.5)]);
/// ```
pub fn decode(
    value: &[u8],
    key: Option<&[u8]>,
    fallback_time_ms: Option<i64>,
    now_ms: i64,
    limits: &Limits,
) -> Result<Metric, DecodeError> {
    if value.len() > limits.max_bytes {
        return Err(DecodeError::TooLarge(value.len(), limits.max_bytes));
    }
    let text = std::str::from_utf8(value).map_err(|_| DecodeError::InvalidUtf8)?;
    let raw: RawRecord = serde_json::from_str(text).map_err(|e| {
        if e.to_string().starts_with("number out of range") {
            DecodeError::NonFinite(format!("a number ({e})"))
        } else if serde_json::from_str::<IgnoredAny>(text).is_ok() {
            // Valid JSON that our visitor refused: only a non-object gets here.
            DecodeError::NotAnObject
        } else {
            DecodeError::MalformedJson(e.to_string())
        }
    })?;
    raw.validate(key, fallback_time_ms, now_ms, limits)
}

/// A field value as seen by the visitor, before validation.
enum FieldValue {
    Number(f64),
    Text(String),
    Other(&'static str),
}

impl FieldValue {
    fn type_name(&self) -> &'static str {
        match self {
            FieldValue::Number(_) => "a number",
            FieldValue::Text(_) => "a string",
            FieldValue::Other(t) => t,
        }
    }
}

impl<'de> Deserialize<'de> for FieldValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_f64<E>(self, v: f64) -> Result<FieldValue, E> {
                Ok(FieldValue::Number(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<FieldValue, E> {
                Ok(FieldValue::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<FieldValue, E> {
                Ok(FieldValue::Number(v as f64))
            }
            fn visit_str<E>(self, v: &str) -> Result<FieldValue, E> {
                Ok(FieldValue::Text(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<FieldValue, E> {
                Ok(FieldValue::Text(v))
            }
            fn visit_bool<E>(self, _: bool) -> Result<FieldValue, E> {
                Ok(FieldValue::Other("a boolean"))
            }
            fn visit_unit<E>(self) -> Result<FieldValue, E> {
                Ok(FieldValue::Other("null"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<FieldValue, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FieldValue::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<FieldValue, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(FieldValue::Other("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

/// The record's fields, collected by one pass over the JSON object.
#[derive(Default)]
struct RawRecord {
    server_id: Option<FieldValue>,
    cpu: Option<FieldValue>,
    ram: Option<FieldValue>,
    time: Option<FieldValue>,
    extra: Vec<(String, f64)>,
}

impl<'de> Deserialize<'de> for RawRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawRecord;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawRecord, A::Error> {
                let mut r = RawRecord::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let value: FieldValue = map.next_value()?;
                    match key.as_ref() {
                        "serverId" => r.server_id = Some(value),
                        "cpu" => r.cpu = Some(value),
                        "ram" => r.ram = Some(value),
                        "ts" | "timestamp" => r.time = Some(value),
                        // Other numbers are kept; other types (tags, notes) are ignored.
                        _ => {
                            if let FieldValue::Number(n) = value {
                                r.extra.push((key.into_owned(), n));
                            }
                        }
                    }
                }
                Ok(r)
            }
        }
        d.deserialize_map(V)
    }
}

impl RawRecord {
    fn validate(
        self,
        key: Option<&[u8]>,
        fallback_time_ms: Option<i64>,
        now_ms: i64,
        limits: &Limits,
    ) -> Result<Metric, DecodeError> {
        let server_id = match self.server_id {
            None => return Err(DecodeError::MissingServerId),
            Some(FieldValue::Text(s)) => s,
            Some(other) => return Err(wrong_type("serverId", "a string", &other)),
        };
        if server_id.is_empty() {
            return Err(DecodeError::EmptyServerId);
        }
        if server_id.len() > MAX_SERVER_ID_BYTES {
            return Err(DecodeError::ServerIdTooLong(server_id.len()));
        }
        if let Some(key) = key {
            if key != server_id.as_bytes() {
                return Err(DecodeError::KeyMismatch {
                    key: String::from_utf8_lossy(key).into_owned(),
                    body: server_id,
                });
            }
        }
        let cpu = number_field("cpu", self.cpu)?;
        let ram = number_field("ram", self.ram)?;
        for (name, v) in &self.extra {
            if !v.is_finite() {
                return Err(DecodeError::NonFinite(name.clone()));
            }
        }
        if cpu.is_none() && ram.is_none() && self.extra.is_empty() {
            return Err(DecodeError::NoMetrics);
        }
        let time_us = match self.time {
            Some(FieldValue::Number(ms)) if ms.is_finite() => (ms * 1000.0).round() as i64,
            Some(FieldValue::Number(_)) => return Err(DecodeError::NonFinite("ts".into())),
            Some(FieldValue::Text(s)) => chrono::DateTime::parse_from_rfc3339(&s)
                .map_err(|e| DecodeError::BadTimestamp(format!("{s:?} is not RFC 3339 ({e})")))?
                .timestamp_micros(),
            Some(other) => return Err(wrong_type("ts", "RFC 3339 text or epoch milliseconds", &other)),
            None => fallback_time_ms.ok_or(DecodeError::MissingTimestamp)? * 1000,
        };
        check_time_window(time_us, now_ms, limits)?;
        Ok(Metric { server_id, time_us, cpu, ram, extra: self.extra })
    }
}

fn wrong_type(field: &str, expected: &'static str, found: &FieldValue) -> DecodeError {
    DecodeError::WrongType { field: field.to_owned(), expected, found: found.type_name() }
}

fn number_field(name: &str, v: Option<FieldValue>) -> Result<Option<f64>, DecodeError> {
    match v {
        None | Some(FieldValue::Other("null")) => Ok(None),
        Some(FieldValue::Number(n)) if n.is_finite() => Ok(Some(n)),
        Some(FieldValue::Number(_)) => Err(DecodeError::NonFinite(name.to_owned())),
        Some(other) => Err(wrong_type(name, "a number", &other)),
    }
}

fn check_time_window(time_us: i64, now_ms: i64, limits: &Limits) -> Result<(), DecodeError> {
    let now_us = now_ms.saturating_mul(1000);
    let earliest = now_us.saturating_sub(limits.max_age.as_micros() as i64);
    let latest = now_us.saturating_add(limits.max_future.as_micros() as i64);
    if time_us < earliest || time_us > latest {
        return Err(DecodeError::TimestampOutOfBounds {
            time: format_micros(time_us),
            window: format!(
                "at most {} old and {} ahead",
                humantime::format_duration(limits.max_age),
                humantime::format_duration(limits.max_future)
            ),
        });
    }
    Ok(())
}

/// RFC 3339 text for a microsecond timestamp (for messages and output).
pub fn format_micros(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| format!("{us}us"))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_700_000_000_000;

    fn dec(json: &str) -> Result<Metric, DecodeError> {
        decode(json.as_bytes(), None, Some(NOW - 1000), NOW, &Limits::default())
    }

    #[test]
    fn valid_record_keeps_extra_numbers_and_ignores_tags() {
        let m = dec(r#"{"serverId":"s17","cpu":45,"ram":60.5,"disk":3,"host":"web-1","ts":1699999999000}"#).unwrap();
        assert_eq!(m.server_id, "s17");
        assert_eq!((m.cpu, m.ram), (Some(45.0), Some(60.5)));
        assert_eq!(m.extra, vec![("disk".to_string(), 3.0)]);
        assert_eq!(m.time_us, 1_699_999_999_000_000);
    }

    #[test]
    fn timestamp_in_both_forms_and_fallback() {
        let a = dec(r#"{"serverId":"a","cpu":1,"ts":"2023-11-14T22:13:20Z"}"#).unwrap();
        let b = dec(r#"{"serverId":"a","cpu":1,"timestamp":1700000000000}"#).unwrap();
        assert_eq!(a.time_us, 1_700_000_000_000_000);
        assert_eq!(a.time_us, b.time_us);
        let c = dec(r#"{"serverId":"a","cpu":1,"ts":"2023-11-14T23:13:20.5+01:00"}"#).unwrap();
        assert_eq!(c.time_us, 1_700_000_000_500_000);
        let fallback = dec(r#"{"serverId":"a","cpu":1}"#).unwrap();
        assert_eq!(fallback.time_us, (NOW - 1000) * 1000);
        let none = decode(br#"{"serverId":"a","cpu":1}"#, None, None, NOW, &Limits::default());
        assert_eq!(none, Err(DecodeError::MissingTimestamp));
    }

    #[test]
    fn each_kind_of_bad_input_has_its_reason() {
        let cases: &[(&str, &str)] = &[
            (r#"{"serverId":"a","cpu":1"#, "malformed_json"),
            ("[1,2]", "not_an_object"),
            ("42", "not_an_object"),
            (r#"{"cpu":1}"#, "missing_server_id"),
            (r#"{"serverId":"","cpu":1}"#, "empty_server_id"),
            (r#"{"serverId":7,"cpu":1}"#, "wrong_type"),
            (r#"{"serverId":"a","cpu":"high"}"#, "wrong_type"),
            (r#"{"serverId":"a","ram":[1]}"#, "wrong_type"),
            (r#"{"serverId":"a","cpu":1e999}"#, "non_finite"),
            (r#"{"serverId":"a","cpu":NaN}"#, "malformed_json"),
            (r#"{"serverId":"a","host":"x"}"#, "no_metrics"),
            (r#"{"serverId":"a","cpu":1,"ts":"yesterday"}"#, "bad_timestamp"),
            (r#"{"serverId":"a","cpu":1,"ts":true}"#, "wrong_type"),
            (r#"{"serverId":"a","cpu":1,"ts":1}"#, "timestamp_out_of_bounds"),
            (r#"{"serverId":"a","cpu":1,"ts":9999999999999}"#, "timestamp_out_of_bounds"),
        ];
        for (json, kind) in cases {
            let err = dec(json).expect_err(json);
            assert_eq!(err.kind(), *kind, "{json}: {err}");
        }
        let long = format!(r#"{{"serverId":"{}","cpu":1}}"#, "x".repeat(257));
        assert_eq!(dec(&long).unwrap_err().kind(), "server_id_too_long");
        let ok = format!(r#"{{"serverId":"{}","cpu":1}}"#, "x".repeat(256));
        assert!(dec(&ok).is_ok());
    }

    #[test]
    fn size_utf8_and_key_checks() {
        let big = vec![b' '; 70_000];
        assert_eq!(decode(&big, None, Some(NOW), NOW, &Limits::default()).unwrap_err().kind(), "too_large");
        assert_eq!(
            decode(b"{\"serverId\":\"\xff\"}", None, Some(NOW), NOW, &Limits::default()),
            Err(DecodeError::InvalidUtf8)
        );
        let body = br#"{"serverId":"s1","cpu":1}"#;
        assert!(decode(body, Some(b"s1"), Some(NOW), NOW, &Limits::default()).is_ok());
        let err = decode(body, Some(b"s2"), Some(NOW), NOW, &Limits::default()).unwrap_err();
        assert_eq!(err.to_string(), r#"message key "s2" disagrees with the body's serverId "s1""#);
    }

    #[test]
    fn null_metric_is_absent() {
        let m = dec(r#"{"serverId":"a","cpu":null,"ram":3}"#).unwrap();
        assert_eq!((m.cpu, m.ram), (None, Some(3.0)));
    }

    proptest! {
        #[test]
        fn encoded_records_decode_to_themselves(
            id in "[a-zA-Z0-9_.-]{1,64}",
            cpu in -1e9f64..1e9,
            ram in proptest::option::of(0f64..100.0),
            extra in proptest::collection::btree_map("[a-z]{1,8}x", -1e6f64..1e6, 0..4),
            age_ms in 0i64..86_400_000,
        ) {
            let mut obj = serde_json::json!({"serverId": id, "cpu": cpu, "ts": NOW - age_ms});
            if let Some(r) = ram { obj["ram"] = r.into(); }
            // Distinct keys (a map), so the expected pairs are exactly what was sent.
            let mut expected_extra: Vec<(String, f64)> = extra.iter().map(|(k, v)| (k.clone(), *v)).collect();
            for (k, v) in &extra {
                obj[k] = (*v).into();
            }
            let text = obj.to_string();
            let m = decode(text.as_bytes(), Some(id.as_bytes()), None, NOW, &Limits::default()).unwrap();
            prop_assert_eq!(&m.server_id, &id);
            prop_assert_eq!(m.cpu, Some(cpu));
            prop_assert_eq!(m.ram, ram);
            prop_assert_eq!(m.time_us, (NOW - age_ms) * 1000);
            let mut got = m.extra.clone();
            got.sort_by(|a, b| a.0.cmp(&b.0));
            expected_extra.sort_by(|a, b| a.0.cmp(&b.0));
            prop_assert_eq!(got, expected_extra);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, None, Some(NOW), NOW, &Limits::default());
        }
    }
}
