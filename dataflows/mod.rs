//! The dataflows, each readable top to bottom as the picture in `docs/architecture.md`.
//!
//! - [`ingest`]: Kafka partitions -> decode -> exchange by serverId -> batch -> durable sink,
//!   with offsets committed behind the frontier.
//!
//! Operators the dataflows share live in [`operators`]; [`topic_watch`] watches the topic
//! under the ingest job (resets, retention gaps, stalls, added partitions).

pub mod ingest;
pub mod operators;
pub mod topic_watch;
