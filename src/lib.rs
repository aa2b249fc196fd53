//! fleetflow: server metrics from Kafka into TimescaleDB with a timely-dataflow job,
//! exactly once. See README.md for the picture and `../shared/notes/design.md` for the
//! promises; each module below owns one concern.
#![deny(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod config;
pub mod envelope;
pub mod gateway;
pub mod job;
pub mod kafka;
pub mod loadgen;
pub mod metrics;
pub mod ops;
pub mod partitioning;
pub mod query;
pub mod record;
pub mod sink;
pub mod stats;

#[path = "../dataflows/mod.rs"]
pub mod dataflows;
