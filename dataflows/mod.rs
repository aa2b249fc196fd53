//! The dataflows, each readable top to bottom as the picture in `design.md`.
//!
//! - [`ingest`]: Kafka partitions -> decode -> exchange by serverId -> batch -> durable sink,
//!   with offsets committed behind the frontier.
//!
//! Operators the dataflows share live in [`operators`].

pub mod ingest;
pub mod operators;
