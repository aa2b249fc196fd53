//! A message on its way through the dataflow: the decoded record (or the reason it could
//! not be decoded) plus where it came from, which is what exactly-once bookkeeping needs.

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::partitioning::{key_group, message_key_group};
use crate::record::{DecodeError, Metric, Name};

/// Bytes of a dead letter's message value kept in [`DeadLetter::raw`]; its whole length and
/// SHA-256 are kept beside them, so a dead letter costs a bounded amount of memory and
/// storage whatever the size of the message.
pub const DEAD_LETTER_RAW_BYTES: usize = 4096;

/// One Kafka message after decoding. Crosses workers, so it is plain data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Decides the sink worker and the watermark the message is checked against.
    pub key_group: u16,
    pub partition: i32,
    pub offset: i64,
    pub item: Item,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Item {
    Metric(Metric),
    DeadLetter(DeadLetter),
}

/// A message that failed decoding, with its reason: its first [`DEAD_LETTER_RAW_BYTES`]
/// bytes, and the length and hash of all of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    /// The start of the message value: all of it up to [`DEAD_LETTER_RAW_BYTES`] bytes.
    pub raw: Vec<u8>,
    /// The length in bytes of the whole message value.
    pub raw_length: i64,
    /// The SHA-256 of the whole message value (32 bytes).
    pub raw_sha256: Vec<u8>,
    pub kind: String,
    pub reason: String,
    /// The Kafka message timestamp, in milliseconds, when it had one.
    pub message_time_ms: Option<i64>,
}

impl DeadLetter {
    /// A dead letter for the message value `raw`: keeps its first [`DEAD_LETTER_RAW_BYTES`]
    /// bytes, its length and its SHA-256 (and at most as many bytes of the key).
    pub fn new(key: Option<&[u8]>, raw: &[u8], kind: &str, reason: String, message_time_ms: Option<i64>) -> DeadLetter {
        DeadLetter {
            // A key can be as large as the message: it is bounded the same way.
            key: key.map(|k| k[..k.len().min(DEAD_LETTER_RAW_BYTES)].to_vec()),
            raw: raw[..raw.len().min(DEAD_LETTER_RAW_BYTES)].to_vec(),
            raw_length: raw.len() as i64,
            raw_sha256: sha2::Sha256::digest(raw).to_vec(),
            kind: kind.to_owned(),
            reason,
            message_time_ms,
        }
    }
}

impl Envelope {
    /// About how many bytes the envelope holds in memory, for the job's byte bounds.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Envelope>()
            + match &self.item {
                Item::Metric(m) => {
                    // Up to four extra fields live inside the envelope (record::Extras).
                    let spilled =
                        if m.extra.spilled() { m.extra.capacity() * std::mem::size_of::<(Name, f64)>() } else { 0 };
                    m.server_id.len() + spilled + m.extra.iter().map(|(name, _)| name.len()).sum::<usize>()
                }
                Item::DeadLetter(d) => {
                    d.raw.len()
                        + d.key.as_ref().map_or(0, Vec::len)
                        + d.kind.len()
                        + d.reason.len()
                        + d.raw_sha256.len()
                }
            }
    }

    /// Wraps a decoding outcome. The key group is [`message_key_group`] of the message, for
    /// a valid record computed from its decoded serverId (the same answer, without parsing
    /// the message again).
    pub fn new(
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        raw: &[u8],
        message_time_ms: Option<i64>,
        decoded: Result<Metric, DecodeError>,
    ) -> Envelope {
        match decoded {
            Ok(metric) => {
                let group = key_group(metric.server_id.as_bytes());
                debug_assert_eq!(group, message_key_group(key, raw, partition), "{metric:?}");
                Envelope { key_group: group, partition, offset, item: Item::Metric(metric) }
            }
            Err(e) => Envelope {
                key_group: message_key_group(key, raw, partition),
                partition,
                offset,
                item: Item::DeadLetter(DeadLetter::new(key, raw, e.kind(), e.to_string(), message_time_ms)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::record::{decode, Limits};

    const NOW: i64 = 1_700_000_000_000;

    fn envelope(key: Option<&[u8]>, value: &[u8], now_ms: i64, limits: &Limits) -> Envelope {
        Envelope::new(3, 42, key, value, Some(now_ms), decode(value, key, Some(now_ms), now_ms, limits))
    }

    #[test]
    fn a_keyless_message_keeps_its_key_group_when_it_turns_valid() {
        let value = format!(r#"{{"serverId":"k1","cpu":1,"ts":{}}}"#, NOW - 7_200_000);
        let strict = Limits { max_age: Duration::from_secs(3600), ..Limits::default() };
        let dead = envelope(None, value.as_bytes(), NOW, &strict);
        let valid = envelope(None, value.as_bytes(), NOW, &Limits::default());
        assert!(matches!(dead.item, Item::DeadLetter(ref d) if d.kind == "timestamp_out_of_bounds"));
        assert!(matches!(valid.item, Item::Metric(_)));
        assert_eq!(dead.key_group, valid.key_group);
        assert_eq!(valid.key_group, key_group(b"k1"));
    }

    #[test]
    fn dead_letters_keep_a_bounded_prefix_the_length_and_the_hash() {
        let small = br#"{"serverId":"a"}"#;
        let Item::DeadLetter(d) = envelope(None, small, NOW, &Limits::default()).item else {
            panic!("not a dead letter")
        };
        assert_eq!((d.raw.as_slice(), d.raw_length), (&small[..], small.len() as i64));
        assert_eq!(d.raw_sha256, sha2::Sha256::digest(small).to_vec());
        // The SHA-256 of the empty string, as a fixed point.
        let empty = DeadLetter::new(None, b"", "k", String::new(), None);
        assert_eq!(empty.raw_sha256[..4], [0xe3, 0xb0, 0xc4, 0x42]);

        let big = vec![b'x'; 1_000_000];
        let Item::DeadLetter(d) = envelope(Some(b"s1"), &big, NOW, &Limits::default()).item else {
            panic!("not a dead letter")
        };
        assert_eq!(d.kind, "too_large");
        assert_eq!(d.raw, big[..DEAD_LETTER_RAW_BYTES]);
        assert_eq!(d.raw_length, 1_000_000);
        assert_eq!(d.raw_sha256, sha2::Sha256::digest(&big).to_vec());
        assert_eq!(d.raw_sha256.len(), 32);
    }

    fn message() -> impl Strategy<Value = (Option<Vec<u8>>, Vec<u8>)> {
        let id = prop_oneof!["s[0-9]{1,3}", ".{0,8}"];
        let body = (id.clone(), proptest::option::of(-20_000_000i64..20_000_000), any::<bool>(), 0usize..3).prop_map(
            |(id, ts, cpu_ok, pad)| {
                let mut obj = serde_json::json!({"serverId": id});
                if let Some(offset) = ts {
                    obj["ts"] = (NOW + offset).into();
                }
                obj["cpu"] = if cpu_ok { 1.into() } else { "high".into() };
                if pad > 0 {
                    obj["note"] = "p".repeat(pad * 40_000).into();
                }
                obj.to_string().into_bytes()
            },
        );
        let value = prop_oneof![4 => body, 1 => proptest::collection::vec(any::<u8>(), 0..64)];
        let key = prop_oneof![
            3 => Just(None),
            1 => Just(Some(Vec::new())),
            1 => "s[0-9]{1,3}".prop_map(|k| Some(k.into_bytes())),
        ];
        (key, value)
    }

    fn limits() -> impl Strategy<Value = (i64, Limits)> {
        (-86_400_000i64..86_400_000, 1usize..200_000, 0u64..30_000, 0u64..30_000).prop_map(
            |(skew, bytes, age, ahead)| {
                let limits = Limits {
                    max_bytes: bytes,
                    max_age: Duration::from_secs(age),
                    max_future: Duration::from_secs(ahead),
                };
                (NOW + skew, limits)
            },
        )
    }

    proptest! {
        /// A message's key group depends on nothing but the message: not on the clock, not on
        /// the limits, not on whether it is valid.
        #[test]
        fn the_key_group_of_a_message_is_the_same_whatever_the_clock_and_limits(
            (key, value) in message(),
            (now_a, limits_a) in limits(),
            (now_b, limits_b) in limits(),
        ) {
            let a = envelope(key.as_deref(), &value, now_a, &limits_a);
            let b = envelope(key.as_deref(), &value, now_b, &limits_b);
            prop_assert_eq!(a.key_group, b.key_group);
            prop_assert_eq!(a.key_group, message_key_group(key.as_deref(), &value, 3));
            let default = envelope(key.as_deref(), &value, NOW, &Limits::default());
            prop_assert_eq!(a.key_group, default.key_group);
        }
    }
}
