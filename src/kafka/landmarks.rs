//! Landmarks: with each committed offset, the offset, Kafka timestamp and a hash of key and
//! value of a message the job read below it (the first of the read call that reached it).
//! Offsets alone cannot tell a topic from one deleted and recreated while the job was
//! stopped once the new topic has grown past the old offsets: the job would resume there and
//! silently skip everything before. At start, the message at each landmark is fetched again;
//! another message there, or none (a transaction marker of the new topic, say), means
//! another topic. The offset held a committed data message when the job read it, and
//! retention only deletes below the low watermark (checked first), so in the same topic it
//! still does; only log compaction could remove it, and a metrics topic is not compacted.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::{client_config, KafkaError};
use crate::config::KafkaConfig;
use crate::sink::offsets::Landmark;

/// FNV-1a over the key's length, the key and the value: the same message gives the same
/// hash in every run and build.
pub fn message_hash(key: Option<&[u8]>, value: Option<&[u8]>) -> i64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    let key = key.unwrap_or_default();
    h.write(&(key.len() as u64).to_le_bytes());
    h.write(key);
    h.write(value.unwrap_or_default());
    h.finish() as i64
}

/// What the topic holds at a landmark now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// The same message (same offset, timestamp, key and value).
    Same,
    /// Another message at the offset (with its timestamp), or none: the first one at or
    /// after it is at `offset`. The topic was recreated.
    Other { offset: i64, time_ms: Option<i64> },
    /// No answer: the broker did not deliver in time, or the message has no timestamp.
    Unknown,
}

/// Fetches the message at each `(partition, landmark)` and compares it.
pub fn check(kafka: &KafkaConfig, marks: &[(i32, Landmark)], timeout: Duration) -> Result<Vec<Found>, KafkaError> {
    let mut found = vec![Found::Unknown; marks.len()];
    if marks.is_empty() {
        return Ok(found);
    }
    let consumer: BaseConsumer = client_config(
        kafka,
        &[
            // Reads only; stores nothing anywhere.
            ("group.id", "fleetflow-landmarks"),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            ("isolation.level", "read_committed"),
        ],
    )
    .create()?;
    let mut list = TopicPartitionList::new();
    for (partition, mark) in marks {
        list.add_partition_offset(&kafka.topic, *partition, Offset::Offset(mark.offset))?;
    }
    consumer.assign(&list)?;
    let deadline = Instant::now() + timeout;
    let mut answered = vec![false; marks.len()];
    while answered.contains(&false) && Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else { continue };
        let Some(i) = marks.iter().position(|(p, _)| *p == message.partition()) else { continue };
        if std::mem::replace(&mut answered[i], true) {
            continue;
        }
        let mark = marks[i].1;
        let time_ms = message.timestamp().to_millis();
        let hash = message_hash(message.key(), message.payload());
        found[i] = match (message.offset() == mark.offset, time_ms) {
            (true, Some(t)) if t == mark.time_ms && hash == mark.hash => Found::Same,
            // A client that cannot read timestamps (an old protocol forced with -X): no verdict.
            (true, None) => Found::Unknown,
            (_, time_ms) => Found::Other { offset: message.offset(), time_ms },
        };
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::offsets::Landmarks;

    #[test]
    fn a_commit_stands_on_the_newest_landmark_below_it() {
        let at = |offset, time_ms| Landmark { offset, time_ms, hash: offset * 7 };
        let marks = Landmarks::default();
        marks.note(0, at(9, 1_000));
        marks.note(0, at(19, 2_000));
        marks.note(1, at(4, 3_000));
        assert_eq!(marks.for_commit(&[(0, 20), (1, 5), (2, 7)]), vec![Some(at(19, 2_000)), Some(at(4, 3_000)), None]);
        // An epoch closed after the first read only: the commit stands on offset 9.
        let marks = Landmarks::default();
        marks.note(0, at(9, 1_000));
        marks.note(0, at(19, 2_000));
        assert_eq!(marks.for_commit(&[(0, 10)]), vec![Some(at(9, 1_000))]);
        // Moving past transaction markers without a message keeps the last landmark.
        assert_eq!(marks.for_commit(&[(0, 25)]), vec![Some(at(19, 2_000))]);
        assert_eq!(marks.for_commit(&[(0, 26)]), vec![Some(at(19, 2_000))]);
    }

    #[test]
    fn landmarks_between_two_commits_are_bounded() {
        let at = |offset| Landmark { offset, time_ms: offset, hash: offset };
        let marks = Landmarks::default();
        for offset in 0..100_000 {
            marks.note(0, at(offset));
        }
        // The newest are kept; a commit below every one left gets none.
        assert_eq!(marks.for_commit(&[(0, 100_000)]), vec![Some(at(99_999))]);
        let marks = Landmarks::default();
        for offset in 0..100_000 {
            marks.note(0, at(offset));
        }
        assert_eq!(marks.for_commit(&[(0, 10)]), vec![None]);
        assert_eq!(marks.for_commit(&[(0, 99_000)]), vec![Some(at(98_999))]);
    }

    #[test]
    fn the_hash_tells_key_from_value_and_is_stable() {
        assert_ne!(message_hash(Some(b"ab"), Some(b"c")), message_hash(Some(b"a"), Some(b"bc")));
        assert_ne!(message_hash(None, Some(b"x")), message_hash(None, Some(b"y")));
        // Pinned: stored landmarks must keep matching across builds.
        assert_eq!(message_hash(None, None), message_hash(Some(b""), Some(b"")));
        assert_eq!(message_hash(Some(b"s1"), Some(b"{}")), 0xee7f_35a7_d9c0_977bu64 as i64);
    }
}
