//! The job's Kafka reader: a consumer per source worker, explicitly assigned the partitions
//! that worker owns and positioned at offsets we choose.
//!
//! No group rebalancing happens inside the job (partition ownership is a pure function of
//! the worker count), and nothing is ever committed or stored automatically: librdkafka's
//! auto-store would otherwise commit messages it fetched but nobody made durable.
//!
//! The reader also keeps what the job needs to explain a partition that cannot be read: the
//! last error librdkafka reported (poll errors do not say which partition they are about).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::{client_config, KafkaError};
use crate::config::KafkaConfig;

/// Throughput and memory settings of the job's consumers for a process of `workers` worker
/// threads (the user's `-X` options still win), each with its reason. The byte settings are
/// a budget of the process, shared by its workers' consumers, so a process does not grow
/// with its worker count.
pub fn consumer_tuning(workers: usize) -> Vec<(&'static str, String)> {
    let share = |process_total: usize, floor: usize| (process_total / workers.max(1)).max(floor).to_string();
    vec![
        // A shorter prefetch queue than librdkafka's default (100k messages per partition):
        // librdkafka keeps about 300 bytes of bookkeeping per queued message besides the
        // payload, which the byte bound below does not count. Refilled often (next
        // setting), 20k kept a worker as busy as 200k did, and a 1x1 drain of 1M records
        // peaked at 96 instead of 157 MiB.
        ("queued.min.messages", "20000".into()),
        // How long a partition's fetching pauses once its queue is full (default 1 s). A
        // short queue drains within that second and the worker would idle: 1x1 read 65k
        // records/s with a 50k queue and the default, 189k with this.
        ("fetch.queue.backoff.ms", "20".into()),
        // The queue is bounded in bytes, too (librdkafka's default is 64 MiB per consumer; what it
        // holds in memory is about twice the payload it counts), so large messages cannot
        // fill memory before the job's own in-flight bound applies: 16 MiB per process (the
        // benchmark read as fast as with 32 MiB per worker).
        ("queued.max.messages.kbytes", share(16 * 1024, 4 * 1024)),
        // One fetch response may carry half that (default 50 MiB): the prefetch bound above
        // holds per fetch, too.
        ("fetch.max.bytes", share(8 << 20, 2 << 20)),
        // Per partition and fetch (default 1 MiB): fewer round trips while a partition has a
        // backlog, still below the fetch bound.
        ("max.partition.fetch.bytes", share(4 << 20, 1 << 20)),
        // How long the broker may hold a fetch that found nothing new (default 500 ms). A
        // broker that polls its storage instead of waking on new data (nisshi sleeps half
        // the time left before it looks again) delays records by up to half of it: at 20k
        // records/s the produce-to-durable median fell from 221 to 66-90 ms with 100 ms.
        // Idle, it costs ten small fetches a second.
        ("fetch.wait.max.ms", "100".into()),
    ]
}

/// Where a partition starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartOffset {
    /// The next offset to read, as committed by an earlier run.
    At(i64),
    Earliest,
    Latest,
}

/// What one poll produced.
pub enum Polled<'a> {
    Message(BorrowedMessage<'a>),
    /// Nothing available right now.
    Nothing,
    /// An error (broker down, a batch that cannot be decoded, ...); librdkafka retries by
    /// itself. The reader remembers it (see [`PartitionReader::last_error`]).
    Error(RdError),
}

/// How long a broker may take to answer a watermark or metadata query of the worker loop
/// (which waits meanwhile).
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

/// The same error is logged again at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Reads the partitions one worker owns.
pub struct PartitionReader {
    consumer: BaseConsumer<ReaderContext>,
    topic: String,
    partitions: Vec<i32>,
    at_end: Vec<bool>,
    paused: bool,
    /// The last poll error logged, and when (the same error is not logged on every poll).
    logged: Option<(String, Instant)>,
}

impl PartitionReader {
    /// Opens a consumer assigned to `starts` (partition, where to begin).
    /// `workers`: how many workers of this process read (they share its memory budget).
    pub fn open(
        kafka: &KafkaConfig,
        group: &str,
        workers: usize,
        starts: &[(i32, StartOffset)],
    ) -> Result<Self, KafkaError> {
        let tuning = consumer_tuning(workers);
        let consumer: BaseConsumer<ReaderContext> =
            client_config(kafka, &reader_settings(group, &tuning)).create_with_context(ReaderContext::default())?;
        consumer.assign(&assignment_of(&kafka.topic, starts)?)?;
        let partitions: Vec<i32> = starts.iter().map(|(p, _)| *p).collect();
        Ok(PartitionReader {
            consumer,
            topic: kafka.topic.clone(),
            at_end: vec![false; partitions.len()],
            partitions,
            paused: false,
            logged: None,
        })
    }

    /// Starts reading more partitions (added to the topic while the job runs), without
    /// touching the ones already assigned.
    pub fn add_partitions(&mut self, starts: &[(i32, StartOffset)]) -> Result<(), RdError> {
        let starts: Vec<(i32, StartOffset)> =
            starts.iter().filter(|(p, _)| !self.partitions.contains(p)).copied().collect();
        if starts.is_empty() {
            return Ok(());
        }
        let assignment = assignment_of(&self.topic, &starts)?;
        self.consumer.incremental_assign(&assignment)?;
        if self.paused {
            self.consumer.pause(&assignment)?;
        }
        for (partition, _) in starts {
            self.partitions.push(partition);
            self.at_end.push(false);
        }
        Ok(())
    }

    /// The topic's partition count as the broker reports it now.
    pub fn partition_count(&self) -> Result<i32, RdError> {
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), QUERY_TIMEOUT)?;
        match metadata.topics().iter().find(|t| t.name() == self.topic) {
            Some(t) if t.error().is_none() => Ok(t.partitions().len() as i32),
            Some(t) => Err(RdError::MetadataFetch(t.error().map(Into::into).unwrap_or(RDKafkaErrorCode::Fail))),
            None => Err(RdError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)),
        }
    }

    /// The low and high watermarks of a partition: the first offset still stored and the
    /// offset the next message will get (for read_committed, the last stable offset).
    pub fn watermarks(&self, partition: i32) -> Result<(i64, i64), RdError> {
        self.consumer.fetch_watermarks(&self.topic, partition, QUERY_TIMEOUT)
    }

    /// The consumer's position per partition, where known: the offset after the last message
    /// or control record (transaction marker) delivered.
    pub fn positions(&self) -> Vec<(i32, i64)> {
        let Ok(list) = self.consumer.position() else { return Vec::new() };
        list.elements_for_topic(&self.topic)
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }

    /// Notes a poll error: remembered for [`PartitionReader::last_error`], logged when it is
    /// new or every 30 s (a partition that cannot be read fails on every fetch).
    pub fn note_error(&mut self, error: &RdError) {
        let text = error.to_string();
        self.consumer.context().remember(&text);
        let repeat = self.logged.as_ref().is_some_and(|(t, at)| *t == text && at.elapsed() < ERROR_LOG_INTERVAL);
        if !repeat {
            tracing::warn!(error = %text, "Kafka read error; librdkafka retries");
            self.logged = Some((text, Instant::now()));
        }
    }

    /// The last error librdkafka reported to this reader (a poll error, a client error or
    /// a warning it logged), and how long ago.
    pub fn last_error(&self) -> Option<(String, Duration)> {
        self.consumer.context().last()
    }

    /// The partitions this reader owns.
    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// Takes the next message, if one is ready; never blocks.
    pub fn poll(&mut self) -> Polled<'_> {
        if self.partitions.is_empty() {
            return Polled::Nothing;
        }
        match self.consumer.poll(Duration::ZERO) {
            None => Polled::Nothing,
            Some(Ok(message)) => {
                use rdkafka::Message;
                if let Some(i) = self.partitions.iter().position(|p| *p == message.partition()) {
                    self.at_end[i] = false;
                }
                Polled::Message(message)
            }
            Some(Err(RdError::PartitionEOF(p))) => {
                if let Some(i) = self.partitions.iter().position(|q| *q == p) {
                    self.at_end[i] = true;
                }
                Polled::Nothing
            }
            Some(Err(e)) => Polled::Error(e),
        }
    }

    /// Stops (`true`) or restarts fetching from the broker. While the job is backpressured
    /// this keeps librdkafka from filling its prefetch queue, so memory stays flat.
    pub fn set_paused(&mut self, paused: bool) {
        if paused == self.paused || self.partitions.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for p in &self.partitions {
            list.add_partition(&self.topic, *p);
        }
        let result = if paused { self.consumer.pause(&list) } else { self.consumer.resume(&list) };
        match result {
            Ok(()) => self.paused = paused,
            Err(e) => tracing::warn!(error = %e, paused, "cannot pause/resume the Kafka consumer"),
        }
    }

    /// True when every owned partition has reported its end since its last message.
    pub fn all_at_end(&self) -> bool {
        self.at_end.iter().all(|e| *e)
    }

    /// The high watermark (offset of the next message to be produced) of a partition.
    pub fn end_offset(&self, partition: i32) -> Result<i64, RdError> {
        self.consumer.fetch_watermarks(&self.topic, partition, Duration::from_secs(10)).map(|(_, high)| high)
    }

    /// Mirrors durable offsets (next offset to read) to the consumer group, for lag tools.
    /// Best effort: the database holds the offsets the job resumes from.
    pub fn commit_to_group(&self, offsets: &[(i32, i64)]) {
        let mut list = TopicPartitionList::new();
        for (partition, next) in offsets {
            if list.add_partition_offset(&self.topic, *partition, Offset::Offset(*next)).is_err() {
                return;
            }
        }
        if let Err(e) = self.consumer.commit(&list, CommitMode::Async) {
            tracing::debug!(error = %e, "mirroring offsets to the consumer group failed");
        }
    }
}

/// The settings of the job's consumers (the user's `-X` options still win).
fn reader_settings<'a>(group: &'a str, tuning: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    let mut settings: Vec<(&str, &str)> = vec![
        // Only where committed offsets are mirrored (for lag tools); partitions are assigned
        // explicitly, so the group never rebalances the job.
        ("group.id", group),
        // Offsets are committed by the job behind the durable frontier, never by librdkafka:
        // its auto-commit and auto-store would commit what was fetched, not what is durable.
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        // End-of-partition events tell the worker a partition is drained (--exit-when-idle,
        // idle epochs).
        ("enable.partition.eof", "true"),
        // A committed offset that retention deleted: start at what is left (the job counts
        // the gap, kafka::watch). An offset beyond the end (a recreated topic) also lands at
        // the start; the job notices the step back and stops.
        ("auto.offset.reset", "earliest"),
        // Transactional producers: records of aborted transactions are never delivered, and
        // open transactions are waited for. This is librdkafka's default; it is set here so
        // that a -X override is a visible decision, not an accident. The consumer's position
        // moves past the commit markers, so lag and committed offsets reach the end.
        ("isolation.level", "read_committed"),
    ];
    settings.extend(tuning.iter().map(|(k, v)| (*k, v.as_str())));
    settings
}

/// The assignment list for `starts`.
fn assignment_of(topic: &str, starts: &[(i32, StartOffset)]) -> Result<TopicPartitionList, RdError> {
    let mut assignment = TopicPartitionList::new();
    for (partition, start) in starts {
        let offset = match start {
            StartOffset::At(o) => Offset::Offset(*o),
            StartOffset::Earliest => Offset::Beginning,
            StartOffset::Latest => Offset::End,
        };
        assignment.add_partition_offset(topic, *partition, offset)?;
    }
    Ok(assignment)
}

/// Client context of the job's consumers: partition-end events are expected (we ask for
/// them to detect idleness), so they are not logged as errors. Remembers the last error or
/// warning, for the line that names a partition that cannot be read.
#[derive(Default)]
pub struct ReaderContext {
    last: Mutex<Option<(String, Instant)>>,
}

impl ReaderContext {
    fn remember(&self, text: &str) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some((text.to_owned(), Instant::now()));
        }
    }

    fn last(&self) -> Option<(String, Duration)> {
        let last = self.last.lock().ok()?;
        last.as_ref().map(|(text, at)| (text.clone(), at.elapsed()))
    }
}

impl rdkafka::ClientContext for ReaderContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= RDKafkaLogLevel::Warning as i32 {
            self.remember(&format!("{fac}: {message}"));
            tracing::debug!(facility = fac, message, "librdkafka warning");
        }
    }

    fn error(&self, error: RdError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            self.remember(&format!("{error}: {reason}"));
            tracing::warn!(error = %error, reason, "Kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_reads_committed_records_and_never_stores_offsets_itself() {
        let tuning = consumer_tuning(3);
        let settings = reader_settings("g", &tuning);
        let get = |key: &str| settings.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v);
        assert_eq!(get("queued.max.messages.kbytes"), Some("5461"), "a third of 16 MiB per worker");
        assert_eq!(get("isolation.level"), Some("read_committed"));
        assert_eq!(get("enable.auto.commit"), Some("false"));
        assert_eq!(get("enable.auto.offset.store"), Some("false"));
        assert_eq!(get("auto.offset.reset"), Some("earliest"));
        // librdkafka accepts them all.
        let mut config = rdkafka::ClientConfig::new();
        for (k, v) in &settings {
            config.set(*k, *v);
        }
        assert!(config.create::<BaseConsumer>().is_ok());
    }

    #[test]
    fn the_consumers_of_a_process_share_its_memory_budget_down_to_a_floor() {
        let kbytes = |workers| consumer_tuning(workers).into_iter().find(|(k, _)| *k == "queued.max.messages.kbytes");
        assert_eq!(kbytes(1).unwrap().1, "16384");
        assert_eq!(kbytes(2).unwrap().1, "8192");
        assert_eq!(kbytes(8).unwrap().1, "4096", "not below the floor");
        assert_eq!(kbytes(0).unwrap().1, "16384", "no division by zero");
    }
}
