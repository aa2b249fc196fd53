//! The producer used by the loadgen (and the gateway): keyed by serverId, idempotent,
//! acks=all, and partitioned with murmur2 so it agrees with Java clients.

use rdkafka::producer::ThreadedProducer;

use super::{client_config, KafkaError};
use crate::config::KafkaConfig;

/// Settings every fleetflow producer uses; the user's `-X` options still win.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("partitioner", "murmur2_random"),
    ("linger.ms", "5"),
    ("batch.num.messages", "10000"),
    ("queue.buffering.max.messages", "500000"),
    ("compression.type", "none"),
];

/// A producer whose delivery reports go to `context`.
pub fn producer<C: rdkafka::producer::ProducerContext + 'static>(
    kafka: &KafkaConfig,
    context: C,
) -> Result<ThreadedProducer<C>, KafkaError> {
    Ok(client_config(kafka, PRODUCER_DEFAULTS).create_with_context(context)?)
}
