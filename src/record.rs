//! The metric record: what a server sends, how it is decoded and validated.
//!
//! The gateway and the job share this module, so a record the gateway accepts is exactly a
//! record the job writes, and a record the job dead-letters carries the same reason the
//! gateway would have given.
//!
//! # What PostgreSQL can store
//!
//! A record the decoder accepts must be one the database accepts, or the job would retry
//! its transaction forever. From valid JSON in valid UTF-8, the one thing `text` and `jsonb`
//! refuse is the NUL character: JSON can carry it as the escape `\u0000`, PostgreSQL text
//! cannot hold it, and jsonb refuses `\u0000` in keys and strings. So a NUL in the serverId
//! or in the name of an extra numeric field (a key of the `extra` jsonb column) is refused as
//! `unstorable_text`. (A NUL in an ignored field, such as a tag, harms nothing and is
//! accepted. Lone UTF-16 surrogates such as `\ud800` are refused by the JSON parser itself,
//! as `malformed_json`; every other code point is storable.) Times are also kept within
//! years 1 to 9999 ([`EARLIEST_TIME_US`], [`LATEST_TIME_US`]) whatever `--max-age` and
//! `--max-future` say, and the `extra` column is bounded: at most [`MAX_EXTRA_FIELDS`]
//! fields, names of at most [`MAX_FIELD_NAME_BYTES`] bytes.
//!
//! Reasons quote input only escaped (`{:?}`) and clipped, so a reason is always storable
//! text of bounded size.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Longest serverId accepted, in bytes.
pub const MAX_SERVER_ID_BYTES: usize = 256;

/// Most extra numeric fields (other than cpu and ram) a record may carry; they become the keys
/// of its `extra` jsonb value. Counted as they arrive (a repeated name counts each time).
pub const MAX_EXTRA_FIELDS: usize = 64;

/// Longest name of an extra numeric field, in bytes.
pub const MAX_FIELD_NAME_BYTES: usize = 128;

/// Ceiling of `--max-message-bytes` (1 MiB, Kafka's default largest message): a larger
/// configured limit is refused at start, and [`decode`] never accepts a larger message
/// whatever [`Limits::max_bytes`] says. Fixed for good, like the number of key groups:
/// keyless messages are routed by the serverId [`body_server_id`] finds in bodies up to
/// this size, and every valid record must lie within it, so that its key group is the one
/// that routing finds (see `partitioning::message_key_group`).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Earliest record time accepted whatever `--max-age` says, 0001-01-01T00:00:00Z, in
/// microseconds since the Unix epoch: RFC 3339 cannot write an earlier year, and
/// PostgreSQL, TimescaleDB and chrono all hold every time from here to [`LATEST_TIME_US`].
pub const EARLIEST_TIME_US: i64 = -62_135_596_800_000_000;

/// Latest record time accepted whatever `--max-future` says, 9999-12-31T23:59:59.999999Z.
pub const LATEST_TIME_US: i64 = 253_402_300_799_999_999;

/// How much of an input string a reason quotes (longer ones are clipped with `…`).
const QUOTE_BYTES: usize = 64;

/// One decoded, validated metric report.
///
/// Crosses worker boundaries (timely serializes it with bincode), so it is a plain struct.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub server_id: Name,
    /// Microseconds since the Unix epoch (PostgreSQL's own resolution).
    pub time_us: i64,
    pub cpu: Option<f64>,
    pub ram: Option<f64>,
    /// Every other numeric field of the report, in the order it arrived.
    pub extra: Extras,
}

/// A server id or a field name: short strings, kept inline (no allocation) up to 24 bytes.
pub type Name = compact_str::CompactString;

/// A record's extra numeric fields. Up to four stay inside the record: the COPY encoder reads
/// them long after decoding, when a heap block of their own was a cache miss per record, and
/// allocating and freeing one per record was most of the job's time in malloc.
pub type Extras = smallvec::SmallVec<[(Name, f64); 4]>;

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
    /// Text PostgreSQL cannot store (a NUL character): `what` names the place.
    #[error("{what} {text:?} contains a NUL character (U+0000), which PostgreSQL text and jsonb cannot store")]
    UnstorableText { what: &'static str, text: String },
    #[error("record has {0} extra numeric fields; the limit is {MAX_EXTRA_FIELDS}")]
    TooManyFields(usize),
    #[error("field name {name:?} is {length} bytes long; the limit is {MAX_FIELD_NAME_BYTES}")]
    FieldNameTooLong { name: String, length: usize },
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
            DecodeError::UnstorableText { .. } => "unstorable_text",
            DecodeError::TooManyFields(_) => "too_many_fields",
            DecodeError::FieldNameTooLong { .. } => "field_name_too_long",
        }
    }
}

/// Bounds a record must respect. The defaults accept a year of back-fill and ten minutes
/// of clock skew into the future. `max_bytes` above [`MAX_MESSAGE_BYTES`] counts as
/// [`MAX_MESSAGE_BYTES`].
#[derive(Clone, Debug, PartialEq, Eq)]
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
/// Every string the result holds is storable text (no NUL), every time lies between
/// [`EARLIEST_TIME_US`] and [`LATEST_TIME_US`], and `extra` holds at most
/// [`MAX_EXTRA_FIELDS`] names of at most [`MAX_FIELD_NAME_BYTES`] bytes.
///
/// ```
/// use fleetflow::record::{decode, Limits};
/// let m = decode(br#"{"serverId":"s17","cpu":45,"ram":60,"disk":3.5}"#, Some(b"s17"),
///                Some(1_700_000_000_000), 1_700_000_000_000, &Limits::default()).unwrap();
/// assert_eq!(m.server_id, "s17");
/// assert_eq!(m.cpu, Some(45.0));
/// assert_eq!(m.extra.to_vec(), vec![("disk".into(), 3.5)]);
/// ```
pub fn decode(
    value: &[u8],
    key: Option<&[u8]>,
    fallback_time_ms: Option<i64>,
    now_ms: i64,
    limits: &Limits,
) -> Result<Metric, DecodeError> {
    let max_bytes = limits.max_bytes.min(MAX_MESSAGE_BYTES);
    if value.len() > max_bytes {
        return Err(DecodeError::TooLarge(value.len(), max_bytes));
    }
    let text = std::str::from_utf8(value).map_err(|_| DecodeError::InvalidUtf8)?;
    let raw: RawRecord = serde_json::from_str(text).map_err(|e| {
        if e.to_string().starts_with("number out of range") {
            DecodeError::NonFinite(format!("a number ({e})"))
        } else if e.classify() == serde_json::error::Category::Data && serde_json::from_str::<IgnoredAny>(text).is_ok()
        {
            // Valid JSON of a type our visitor refused: only a non-object gets here (field
            // values accept any type). A lone surrogate (`"\ud800"`), which IgnoredAny lets
            // through, is a syntax error of the full parse, so malformed JSON.
            DecodeError::NotAnObject
        } else {
            DecodeError::MalformedJson(e.to_string())
        }
    })?;
    raw.validate(key, fallback_time_ms, now_ms, limits)
}

/// The serverId a message body names, for routing: the value of the object's last
/// `serverId` member when that value is a string, for a body of at most
/// [`MAX_MESSAGE_BYTES`] bytes of UTF-8 holding one JSON object; else `None`.
///
/// A pure function of the bytes (no limits, no clock), so a message gets the same answer in
/// every run. For every message [`decode`] accepts without a key it returns the decoded
/// serverId (decode also keeps the last `serverId`, and rejects larger messages).
///
/// ```
/// use fleetflow::record::body_server_id;
/// assert_eq!(body_server_id(br#"{"serverId":"s17","cpu":"high"}"#).as_deref(), Some("s17"));
/// assert_eq!(body_server_id(br#"{"serverId":7}"#), None);
/// assert_eq!(body_server_id(b"not json"), None);
/// ```
pub fn body_server_id(value: &[u8]) -> Option<Cow<'_, str>> {
    if value.len() > MAX_MESSAGE_BYTES {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?;
    serde_json::from_str::<ServerIdOnly>(text).ok()?.0
}

/// A JSON object seen only for its `serverId` (other values are skipped, not built).
struct ServerIdOnly<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for ServerIdOnly<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ServerIdOnly<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut id = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "serverId" {
                        // The same visitor as decode's, so both see the same serverId.
                        id = match map.next_value::<FieldValue>()? {
                            FieldValue::Text(s) => Some(Cow::Owned(s.into_string())),
                            _ => None,
                        };
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ServerIdOnly(id))
            }
        }
        d.deserialize_map(V)
    }
}

/// A field value as seen by the visitor, before validation.
enum FieldValue {
    Number(f64),
    Text(Name),
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
                Ok(FieldValue::Text(Name::new(v)))
            }
            fn visit_string<E>(self, v: String) -> Result<FieldValue, E> {
                Ok(FieldValue::Text(Name::from(v)))
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
    /// The first [`MAX_EXTRA_FIELDS`] extra numbers (a record with more is refused anyway).
    extra: Extras,
    /// How many extra numbers the object held.
    extra_fields: usize,
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
                                r.extra_fields += 1;
                                if r.extra.len() < MAX_EXTRA_FIELDS {
                                    r.extra.push((Name::new(&key), n));
                                }
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
        if server_id.contains('\0') {
            return Err(DecodeError::UnstorableText { what: "serverId", text: server_id.into_string() });
        }
        // An empty key is no key (some producers send one), as in routing.
        if let Some(key) = key.filter(|k| !k.is_empty()) {
            if key != server_id.as_bytes() {
                return Err(DecodeError::KeyMismatch {
                    key: clip(&String::from_utf8_lossy(key), MAX_SERVER_ID_BYTES),
                    body: server_id.into_string(),
                });
            }
        }
        let cpu = number_field("cpu", self.cpu)?;
        let ram = number_field("ram", self.ram)?;
        if self.extra_fields > MAX_EXTRA_FIELDS {
            return Err(DecodeError::TooManyFields(self.extra_fields));
        }
        for (name, v) in &self.extra {
            if name.len() > MAX_FIELD_NAME_BYTES {
                return Err(DecodeError::FieldNameTooLong { name: clip(name, QUOTE_BYTES), length: name.len() });
            }
            if name.contains('\0') {
                return Err(DecodeError::UnstorableText { what: "field name", text: name.to_string() });
            }
            if !v.is_finite() {
                return Err(DecodeError::NonFinite(name.to_string()));
            }
        }
        if cpu.is_none() && ram.is_none() && self.extra.is_empty() {
            return Err(DecodeError::NoMetrics);
        }
        let time_us = match self.time {
            Some(FieldValue::Number(ms)) if ms.is_finite() => (ms * 1000.0).round() as i64,
            Some(FieldValue::Number(_)) => return Err(DecodeError::NonFinite("ts".into())),
            Some(FieldValue::Text(s)) => chrono::DateTime::parse_from_rfc3339(&s)
                .map_err(|e| DecodeError::BadTimestamp(format!("{:?} is not RFC 3339 ({e})", clip(&s, QUOTE_BYTES))))?
                .timestamp_micros(),
            Some(other) => return Err(wrong_type("ts", "RFC 3339 text or epoch milliseconds", &other)),
            None => fallback_time_ms.ok_or(DecodeError::MissingTimestamp)?.saturating_mul(1000),
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

/// At most `max` bytes of `s` (cut at a character boundary), with `…` when clipped.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn check_time_window(time_us: i64, now_ms: i64, limits: &Limits) -> Result<(), DecodeError> {
    if !(EARLIEST_TIME_US..=LATEST_TIME_US).contains(&time_us) {
        return Err(DecodeError::TimestampOutOfBounds {
            time: format_micros(time_us),
            window: "years 1 to 9999, what RFC 3339 and PostgreSQL both hold".to_owned(),
        });
    }
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
        assert_eq!(m.extra.to_vec(), vec![("disk".into(), 3.0)]);
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
        assert!(decode(body, Some(b""), Some(NOW), NOW, &Limits::default()).is_ok(), "an empty key is no key");
        let err = decode(body, Some(b"s2"), Some(NOW), NOW, &Limits::default()).unwrap_err();
        assert_eq!(err.to_string(), r#"message key "s2" disagrees with the body's serverId "s1""#);
    }

    #[test]
    fn what_postgresql_cannot_store_is_refused_with_its_reason() {
        let err = dec(r#"{"serverId":"p\u0000x","cpu":1}"#).unwrap_err();
        assert_eq!(err.kind(), "unstorable_text");
        assert_eq!(
            err.to_string(),
            r#"serverId "p\0x" contains a NUL character (U+0000), which PostgreSQL text and jsonb cannot store"#
        );
        let err = dec(r#"{"serverId":"a","cpu":1,"d\u0000isk":3}"#).unwrap_err();
        assert_eq!(err.kind(), "unstorable_text");
        assert!(err.to_string().starts_with(r#"field name "d\0isk" contains a NUL"#), "{err}");
        // The key is checked after the serverId: a keyed message gets the same reason.
        let err = decode(b"{\"serverId\":\"p\\u0000x\",\"cpu\":1}", Some(b"p\0x"), Some(NOW), NOW, &Limits::default());
        assert_eq!(err.unwrap_err().kind(), "unstorable_text");
        // Ignored fields are not stored, so a NUL there harms nothing.
        assert!(dec(r#"{"serverId":"a","cpu":1,"host":"w\u0000b","t\u0000ag":"x"}"#).is_ok());
        // Lone surrogates never get this far: the JSON parser refuses them; pairs are fine.
        for json in [
            r#"{"serverId":"\ud800","cpu":1}"#,
            r#"{"serverId":"a\udc00","cpu":1}"#,
            r#"{"serverId":"a","\ud800x":1}"#,
            r#"{"serverId":"a","cpu":1,"\udfff":2}"#,
        ] {
            assert_eq!(dec(json).unwrap_err().kind(), "malformed_json", "{json}");
        }
        let m = dec(r#"{"serverId":"\ud83d\ude00","cpu":1,"\u00e9t\u00e9":2}"#).unwrap();
        assert_eq!(m.server_id, "\u{1F600}");
        assert_eq!(m.extra.to_vec(), vec![("\u{e9}t\u{e9}".into(), 2.0)]);
    }

    #[test]
    fn extra_fields_are_bounded_in_number_and_name_length() {
        let record = |n: usize, name_len: usize| {
            let fields: Vec<String> = (0..n).map(|i| format!(r#""{}{i:03}":{i}"#, "f".repeat(name_len - 3))).collect();
            format!(r#"{{"serverId":"a","cpu":1,"ram":2,"ts":{NOW},"tag":"x",{}}}"#, fields.join(","))
        };
        assert_eq!(dec(&record(MAX_EXTRA_FIELDS, 8)).unwrap().extra.len(), MAX_EXTRA_FIELDS);
        let err = dec(&record(MAX_EXTRA_FIELDS + 1, 8)).unwrap_err();
        assert_eq!(err.kind(), "too_many_fields");
        assert_eq!(err.to_string(), "record has 65 extra numeric fields; the limit is 64");
        let err = dec(&record(4_000, 4)).unwrap_err();
        assert_eq!(err.to_string(), "record has 4000 extra numeric fields; the limit is 64");

        assert!(dec(&record(1, MAX_FIELD_NAME_BYTES)).is_ok());
        let err = dec(&record(1, MAX_FIELD_NAME_BYTES + 1)).unwrap_err();
        assert_eq!(err.kind(), "field_name_too_long");
        let long = format!("{}…", "f".repeat(QUOTE_BYTES));
        assert_eq!(err.to_string(), format!("field name {long:?} is 129 bytes long; the limit is 128"));
        // A long name of an ignored (non-numeric) field is not stored, so not limited.
        assert!(dec(&format!(r#"{{"serverId":"a","cpu":1,"{}":"x"}}"#, "n".repeat(1000))).is_ok());
    }

    #[test]
    fn times_stay_storable_whatever_the_window() {
        let wide = Limits {
            max_age: Duration::from_secs(1 << 40),
            max_future: Duration::from_secs(1 << 40),
            ..Limits::default()
        };
        let at =
            |ts: &str| decode(format!(r#"{{"serverId":"a","cpu":1,"ts":{ts}}}"#).as_bytes(), None, None, NOW, &wide);
        assert!(at(r#""0001-01-01T00:00:00Z""#).is_ok());
        assert!(at(r#""9999-12-31T23:59:59.999999Z""#).is_ok());
        assert_eq!(at("-62135596800000").unwrap().time_us, EARLIEST_TIME_US);
        for ts in ["-62135596800001", "253402300800000", "1e300", "-1e300", r#""0001-01-01T00:00:00+01:00""#] {
            assert_eq!(at(ts).unwrap_err().kind(), "timestamp_out_of_bounds", "{ts}");
        }
        // A Kafka timestamp far out (or absurd) is refused, not overflowed.
        let far = decode(br#"{"serverId":"a","cpu":1}"#, None, Some(i64::MAX), NOW, &wide);
        assert_eq!(far.unwrap_err().kind(), "timestamp_out_of_bounds");
    }

    #[test]
    fn max_bytes_never_exceeds_the_ceiling() {
        let huge = Limits { max_bytes: 64 * MAX_MESSAGE_BYTES, ..Limits::default() };
        let body = format!(r#"{{"serverId":"a","cpu":1,"pad":"{}"}}"#, "y".repeat(MAX_MESSAGE_BYTES));
        let err = decode(body.as_bytes(), None, Some(NOW), NOW, &huge).unwrap_err();
        assert_eq!(err, DecodeError::TooLarge(body.len(), MAX_MESSAGE_BYTES));
        let fits = format!(r#"{{"serverId":"a","cpu":1,"pad":"{}"}}"#, "y".repeat(MAX_MESSAGE_BYTES - 100));
        assert!(decode(fits.as_bytes(), None, Some(NOW), NOW, &huge).is_ok());
    }

    #[test]
    fn reasons_quote_input_clipped() {
        let key = "k".repeat(1_000_000);
        let err = decode(br#"{"serverId":"s1","cpu":1}"#, Some(key.as_bytes()), Some(NOW), NOW, &Limits::default());
        let reason = err.unwrap_err().to_string();
        assert!(reason.len() < 400, "{} bytes", reason.len());
        assert!(reason.contains("kkk…"), "{reason}");
        let ts = r"\u00e9".repeat(10_000);
        let reason = dec(&format!(r#"{{"serverId":"a","cpu":1,"ts":"{ts}"}}"#)).unwrap_err().to_string();
        assert!(reason.len() < 400 && reason.contains("éé…"), "{reason}");
    }

    #[test]
    fn body_server_id_is_what_decode_keeps() {
        let id = |json: &str| body_server_id(json.as_bytes()).map(Cow::into_owned);
        assert_eq!(id(r#"{"serverId":"s1","cpu":1}"#).as_deref(), Some("s1"));
        // The last serverId wins, as in decode.
        let dup = r#"{"serverId":"s1","cpu":1,"serverId":"s2"}"#;
        assert_eq!(id(dup).as_deref(), Some("s2"));
        assert_eq!(dec(dup).unwrap().server_id, "s2");
        assert_eq!(id(r#"{"serverId":"s1","serverId":7}"#), None);
        // Escapes are decoded, in the key and the value.
        assert_eq!(id(r#"{"server\u0049d":"s\u0031","cpu":1}"#).as_deref(), Some("s1"));
        assert_eq!(dec(r#"{"server\u0049d":"s\u0031","cpu":1}"#).unwrap().server_id, "s1");
        // Whatever else is wrong with the record, and whatever the limits or the clock.
        assert_eq!(id(r#"{"serverId":"s1","cpu":"high","ts":1,"x":{"serverId":"no"}}"#).as_deref(), Some("s1"));
        assert_eq!(id(r#"{"serverId":"p\u0000x"}"#).as_deref(), Some("p\0x"));
        for json in ["", "[]", "42", r#""s1""#, r#"{"serverId":"s1""#, r#"{"serverId":"s1"} x"#, r#"{"cpu":1}"#] {
            assert_eq!(id(json), None, "{json}");
        }
        assert_eq!(body_server_id(b"{\"serverId\":\"s1\",\"x\":\"\xff\"}"), None);
        let big = format!(r#"{{"serverId":"s1","pad":"{}"}}"#, "y".repeat(MAX_MESSAGE_BYTES));
        assert_eq!(id(&big), None);
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
            extra in proptest::collection::btree_map("[a-z]{1,8}x", -1e6f64..1e6, 0..8),
            age_ms in 0i64..86_400_000,
        ) {
            let mut obj = serde_json::json!({"serverId": id, "cpu": cpu, "ts": NOW - age_ms});
            if let Some(r) = ram { obj["ram"] = r.into(); }
            // Distinct keys (a map), so the expected pairs are exactly what was sent.
            let mut expected_extra: Vec<(Name, f64)> = extra.iter().map(|(k, v)| (k.as_str().into(), *v)).collect();
            for (k, v) in &extra {
                obj[k] = (*v).into();
            }
            let text = obj.to_string();
            let m = decode(text.as_bytes(), Some(id.as_bytes()), None, NOW, &Limits::default()).unwrap();
            prop_assert_eq!(&m.server_id, &id);
            prop_assert_eq!(m.cpu, Some(cpu));
            prop_assert_eq!(m.ram, ram);
            prop_assert_eq!(m.time_us, (NOW - age_ms) * 1000);
            let mut got = m.extra.to_vec();
            got.sort_by(|a, b| a.0.cmp(&b.0));
            expected_extra.sort_by(|a, b| a.0.cmp(&b.0));
            prop_assert_eq!(got, expected_extra);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, None, Some(NOW), NOW, &Limits::default());
            let _ = body_server_id(&bytes);
        }

        /// Any strings as serverId, field names and tags: decode refuses the record or keeps
        /// only storable text, and its reason is storable, bounded text.
        #[test]
        fn accepted_records_hold_only_storable_text(
            id in proptest::string::string_regex("(.|\u{0}){0,40}").unwrap(),
            names in proptest::collection::vec(proptest::string::string_regex("(.|\u{0}){0,150}").unwrap(), 0..4),
            tag in ".*",
            key in prop_oneof![
                2 => Just(None),
                1 => Just(Some(Vec::new())),
                1 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Some),
            ],
            fallback in prop_oneof![3 => Just(Some(NOW)), 1 => proptest::option::of(any::<i64>())],
            same_key in any::<bool>(),
        ) {
            // Often a key equal to the serverId, so that keyed records get accepted too.
            let key = if same_key && key.is_some() { Some(id.as_bytes().to_vec()) } else { key };
            let mut obj = serde_json::json!({"serverId": id, "tag": tag});
            for (i, name) in names.iter().enumerate() {
                obj[name] = (i as f64).into();
            }
            let text = obj.to_string();
            match decode(text.as_bytes(), key.as_deref(), fallback, NOW, &Limits::default()) {
                Ok(m) => {
                    prop_assert!(!m.server_id.contains('\0'));
                    prop_assert!(m.extra.iter().all(|(n, _)| !n.contains('\0') && n.len() <= MAX_FIELD_NAME_BYTES));
                    prop_assert!((EARLIEST_TIME_US..=LATEST_TIME_US).contains(&m.time_us));
                    if key.is_none() {
                        let routed = body_server_id(text.as_bytes());
                        prop_assert_eq!(routed.as_deref(), Some(m.server_id.as_str()));
                    }
                }
                Err(e) => {
                    let reason = e.to_string();
                    prop_assert!(!reason.contains('\0'), "{:?}", reason);
                    // Quotes are clipped; escaping can grow them at most sixfold.
                    prop_assert!(reason.len() < 4096, "{} bytes", reason.len());
                }
            }
        }
    }
}
