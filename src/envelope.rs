//! A message on its way through the dataflow: the decoded record (or the reason it could
//! not be decoded) plus where it came from, which is what exactly-once bookkeeping needs.

use serde::{Deserialize, Serialize};

use crate::partitioning::{dead_letter_key_group, key_group};
use crate::record::{DecodeError, Metric};

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

/// A message that failed decoding, kept whole with its reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub raw: Vec<u8>,
    pub kind: String,
    pub reason: String,
    /// The Kafka message timestamp, in milliseconds, when it had one.
    pub message_time_ms: Option<i64>,
}

impl Envelope {
    /// Wraps a decoding outcome.
    pub fn new(
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        raw: &[u8],
        message_time_ms: Option<i64>,
        decoded: Result<Metric, DecodeError>,
    ) -> Envelope {
        match decoded {
            Ok(metric) => Envelope {
                key_group: key_group(metric.server_id.as_bytes()),
                partition,
                offset,
                item: Item::Metric(metric),
            },
            Err(e) => Envelope {
                key_group: dead_letter_key_group(key, partition),
                partition,
                offset,
                item: Item::DeadLetter(DeadLetter {
                    key: key.map(<[u8]>::to_vec),
                    raw: raw.to_vec(),
                    kind: e.kind().to_owned(),
                    reason: e.to_string(),
                    message_time_ms,
                }),
            },
        }
    }
}
