//! fleetflow: server metrics from Kafka into TimescaleDB with a timely-dataflow job,
//! exactly once. See README.md for the picture and `docs/architecture.md` for the
//! promises; each module below owns one concern.
#![deny(unsafe_code)]

pub mod alerts;
pub mod bench;
pub mod cli;
pub mod config;
pub mod context;
pub mod envelope;
pub mod exit;
pub mod gateway;
pub mod ingest;
pub mod job;
pub mod kafka;
pub mod lifecycle;
pub mod loadgen;
pub mod machine;
pub mod metrics;
pub mod ops;
pub mod partitioning;
pub mod query;
pub mod record;
pub mod report;
pub mod sink;
pub mod stats;

/// An error and its causes as one line for the user, leaving out a cause whose text the line
/// already holds (our messages and the client libraries' often quote their cause).
///
/// ```
/// let e = anyhow::anyhow!("connection refused").context("cannot reach the database: connection refused");
/// assert_eq!(fleetflow::one_line(&e), "cannot reach the database: connection refused");
/// ```
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}
