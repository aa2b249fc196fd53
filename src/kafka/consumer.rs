//! The job's Kafka reader: a consumer per source worker, explicitly assigned the partitions
//! that worker owns and positioned at offsets we choose.
//!
//! No group rebalancing happens inside the job (partition ownership is a pure function of
//! the worker count), and nothing is ever committed or stored automatically: librdkafka's
//! auto-store would otherwise commit messages it fetched but nobody made durable.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Offset, TopicPartitionList};

use super::{client_config, KafkaError};
use crate::cli::KafkaArgs;

/// Throughput settings of the job's consumers (the user's `-X` options still win):
/// librdkafka's defaults leave throughput on the table (infrastructure.md).
pub const CONSUMER_TUNING: &[(&str, &str)] =
    &[("queued.min.messages", "200000"), ("fetch.max.bytes", "52428800"), ("max.partition.fetch.bytes", "10485760")];

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
    /// A transient error (broker down, ...); librdkafka retries by itself.
    Error(RdError),
}

/// Reads the partitions one worker owns.
pub struct PartitionReader {
    consumer: BaseConsumer<ReaderContext>,
    topic: String,
    partitions: Vec<i32>,
    at_end: Vec<bool>,
    paused: bool,
}

impl PartitionReader {
    /// Opens a consumer assigned to `starts` (partition, where to begin).
    pub fn open(kafka: &KafkaArgs, group: &str, starts: &[(i32, StartOffset)]) -> Result<Self, KafkaError> {
        let mut settings: Vec<(&str, &str)> = vec![
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
            // A committed offset that retention deleted: start at what is left.
            ("auto.offset.reset", "earliest"),
        ];
        settings.extend_from_slice(CONSUMER_TUNING);
        let consumer: BaseConsumer<ReaderContext> =
            client_config(kafka, &settings).create_with_context(ReaderContext)?;
        let mut assignment = TopicPartitionList::new();
        for (partition, start) in starts {
            let offset = match start {
                StartOffset::At(o) => Offset::Offset(*o),
                StartOffset::Earliest => Offset::Beginning,
                StartOffset::Latest => Offset::End,
            };
            assignment.add_partition_offset(&kafka.topic, *partition, offset)?;
        }
        consumer.assign(&assignment)?;
        let partitions: Vec<i32> = starts.iter().map(|(p, _)| *p).collect();
        Ok(PartitionReader {
            consumer,
            topic: kafka.topic.clone(),
            at_end: vec![false; partitions.len()],
            partitions,
            paused: false,
        })
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

    /// Messages between `next_offsets` and each partition's end (asks the broker).
    pub fn lag(&self, next_offsets: &[(i32, i64)]) -> Option<Vec<(i32, i64)>> {
        next_offsets
            .iter()
            .map(|(partition, next)| {
                let (_, high) = self.consumer.fetch_watermarks(&self.topic, *partition, Duration::from_secs(1)).ok()?;
                Some((*partition, (high - next).max(0)))
            })
            .collect()
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

/// Client context of the job's consumers: partition-end events are expected (we ask for
/// them to detect idleness), so they are not logged as errors.
pub struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: RdError, reason: &str) {
        if error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(error = %error, reason, "Kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}
