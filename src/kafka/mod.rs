//! Kafka: client settings, the consumer of the job and the source it feeds the dataflow
//! (`source`, watched by `topic_watch` over the pure bookkeeping of `watch`), the producer
//! of the loadgen and the gateway, topic administration.

pub mod admin;
pub mod consumer;
pub mod landmarks;
pub mod producer;
pub mod source;
pub mod topic_watch;
pub mod watch;

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

/// Errors talking to Kafka, worded for the person who has to fix them.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("cannot reach Kafka at {brokers}: {source}")]
    Unreachable { brokers: String, source: rdkafka::error::KafkaError },
    #[error("topic {topic:?} does not exist on {brokers} (create it: fleetflow topic create --topic {topic} --partitions 4)")]
    UnknownTopic { topic: String, brokers: String },
    #[error("Kafka client error: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
}

/// The base client settings: brokers plus the user's pass-through `-X key=value` options
/// (TLS, SASL, tuning), which win over our defaults.
pub fn client_config(kafka: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (k, v) in &kafka.options {
        config.set(k, v);
    }
    config
}

/// The compression codecs this build of librdkafka can decode, as it reports them.
pub fn codecs() -> Vec<&'static str> {
    let features =
        ClientConfig::new().create_native_config().and_then(|c| c.get("builtin.features")).unwrap_or_default();
    let features: Vec<&str> = features.split(',').map(str::trim).collect();
    ["gzip", "snappy", "lz4", "zstd"].into_iter().filter(|codec| features.contains(codec)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_codec_producers_use_is_built_in() {
        // A codec missing here stops every partition holding such a batch, for good.
        assert_eq!(super::codecs(), ["gzip", "snappy", "lz4", "zstd"]);
    }
}
