//! Topic administration and metadata look-ups.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::{client_config, KafkaError};
use crate::config::KafkaConfig;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Maps a client error to "cannot reach Kafka at <brokers>".
fn unreachable(kafka: &KafkaConfig) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaError + '_ {
    |source| KafkaError::Unreachable { brokers: kafka.brokers.clone(), source }
}

/// The number of partitions of the topic, or a clear error when the broker is unreachable
/// or the topic does not exist.
pub fn partition_count(kafka: &KafkaConfig) -> Result<i32, KafkaError> {
    let consumer: BaseConsumer = client_config(kafka, &[]).create()?;
    let metadata = consumer.fetch_metadata(Some(&kafka.topic), METADATA_TIMEOUT).map_err(unreachable(kafka))?;
    match metadata.topics().iter().find(|t| t.name() == kafka.topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len() as i32),
        _ => Err(KafkaError::UnknownTopic { topic: kafka.topic.clone(), brokers: kafka.brokers.clone() }),
    }
}

/// Creates the topic; an existing topic with the same partition count is fine.
pub async fn create_topic(kafka: &KafkaConfig, partitions: i32, replication: i32) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka, &[]).create()?;
    // An unreachable broker fails here within the metadata timeout (the admin request alone
    // would wait a minute and then say less).
    let metadata = tokio::task::block_in_place(|| admin.inner().fetch_metadata(None, METADATA_TIMEOUT));
    metadata.map_err(unreachable(kafka))?;
    let topic = NewTopic::new(&kafka.topic, partitions, TopicReplication::Fixed(replication));
    let options = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT)).request_timeout(Some(METADATA_TIMEOUT));
    let results = admin.create_topics([&topic], &options).await.map_err(unreachable(kafka))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::Client(rdkafka::error::KafkaError::AdminOp(code)))
                    .inspect_err(|_| tracing::error!(topic = %name, ?code, "topic creation failed"))
            }
        }
    }
    let existing = tokio::task::block_in_place(|| partition_count(kafka))?;
    if existing != partitions {
        tracing::warn!(topic = %kafka.topic, existing, requested = partitions, "topic exists with another partition count");
    }
    Ok(())
}

/// The high watermark of one partition: the offset the next produced message will get.
pub fn end_offset(kafka: &KafkaConfig, partition: i32) -> Result<i64, KafkaError> {
    let (_, _, high) = watermarks(kafka, &[partition])?[0];
    Ok(high)
}

/// The low and high watermarks of each partition: the first offset still stored, and the
/// offset the next produced message will get.
pub fn watermarks(kafka: &KafkaConfig, partitions: &[i32]) -> Result<Vec<(i32, i64, i64)>, KafkaError> {
    watermarks_each(kafka, partitions)?.into_iter().map(|(p, marks)| marks.map(|(low, high)| (p, low, high))).collect()
}

/// Like [`watermarks`], with an answer (or the reason there is none) per partition.
#[allow(clippy::type_complexity)]
pub fn watermarks_each(
    kafka: &KafkaConfig,
    partitions: &[i32],
) -> Result<Vec<(i32, Result<(i64, i64), KafkaError>)>, KafkaError> {
    let consumer: BaseConsumer = client_config(kafka, &[]).create()?;
    Ok(partitions
        .iter()
        .map(|p| (*p, consumer.fetch_watermarks(&kafka.topic, *p, METADATA_TIMEOUT).map_err(unreachable(kafka))))
        .collect())
}
