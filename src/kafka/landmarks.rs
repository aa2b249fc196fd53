//! Landmarks: with each committed offset, the offset and Kafka timestamp of the last message
//! the job read below it. Offsets alone cannot tell a topic from one deleted and recreated
//! while the job was stopped once the new topic has grown past the old offsets: the job
//! would resume there and silently skip everything before. At start, the message at each
//! landmark is fetched again; another timestamp there means another topic.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::{client_config, KafkaError};
use crate::config::KafkaConfig;

/// The message a commit stands on: its offset and its Kafka timestamp (ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landmark {
    pub offset: i64,
    pub time_ms: i64,
}

/// Messages the source read, per partition, by the next offset after them; the committer
/// takes the one below each offset it commits. Shared by a worker's source and committer.
#[derive(Debug, Default)]
pub struct Landmarks {
    seen: Mutex<HashMap<i32, BTreeMap<i64, Landmark>>>,
}

impl Landmarks {
    /// The source read `offset` of `partition`, produced at `time_ms` (noted once per read
    /// call and partition: epochs close between read calls).
    pub fn note(&self, partition: i32, offset: i64, time_ms: i64) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.entry(partition).or_default().insert(offset + 1, Landmark { offset, time_ms });
        }
    }

    /// The landmark below each committed offset, when one is known; older ones are forgotten.
    pub fn for_commit(&self, offsets: &[(i32, i64)]) -> Vec<Option<Landmark>> {
        let Ok(mut seen) = self.seen.lock() else { return vec![None; offsets.len()] };
        offsets
            .iter()
            .map(|(partition, next)| {
                let marks = seen.get_mut(partition)?;
                let (&key, &mark) = marks.range(..=*next).next_back()?;
                // Keep this one (a later commit may move without new messages) and newer ones.
                *marks = marks.split_off(&key);
                Some(mark)
            })
            .collect()
    }
}

/// What the topic holds at a landmark now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// The same message (same offset, same timestamp).
    Same,
    /// Another message: the topic was recreated.
    Other { time_ms: Option<i64> },
    /// No answer (no message at that offset any more, or the broker did not deliver in time).
    Unknown,
}

/// Fetches the message at each `(partition, landmark)` and compares its timestamp.
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
        found[i] = match (message.offset() == mark.offset, time_ms == Some(mark.time_ms)) {
            (true, true) => Found::Same,
            (true, false) => Found::Other { time_ms },
            // The offset holds no message any more (a transaction marker, compaction): no verdict.
            (false, _) => Found::Unknown,
        };
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_stands_on_the_last_message_read_below_it() {
        let marks = Landmarks::default();
        marks.note(0, 9, 1_000);
        marks.note(0, 19, 2_000);
        marks.note(1, 4, 3_000);
        assert_eq!(
            marks.for_commit(&[(0, 20), (1, 5), (2, 7)]),
            vec![Some(Landmark { offset: 19, time_ms: 2_000 }), Some(Landmark { offset: 4, time_ms: 3_000 }), None]
        );
        // An epoch closed after the first read only: the commit stands on offset 9.
        let marks = Landmarks::default();
        marks.note(0, 9, 1_000);
        marks.note(0, 19, 2_000);
        assert_eq!(marks.for_commit(&[(0, 10)]), vec![Some(Landmark { offset: 9, time_ms: 1_000 })]);
        // Moving past transaction markers without a message keeps the last landmark.
        assert_eq!(marks.for_commit(&[(0, 25)]), vec![Some(Landmark { offset: 19, time_ms: 2_000 })]);
        assert_eq!(marks.for_commit(&[(0, 26)]), vec![Some(Landmark { offset: 19, time_ms: 2_000 })]);
    }
}
