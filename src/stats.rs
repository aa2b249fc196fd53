//! Counters shared by the workers of one process, read by the progress report (and later
//! the /metrics endpoint). Plain atomics: cheap enough to bump per batch.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct Stats {
    /// Messages taken from Kafka.
    pub records_read: AtomicU64,
    /// Messages that failed decoding (dead letters produced).
    pub dead_letters: AtomicU64,
    /// Metric rows committed to the database.
    pub rows_written: AtomicU64,
    /// Dead letters committed to the database.
    pub dead_letters_written: AtomicU64,
    /// Replayed messages dropped because their watermark showed them already written.
    pub replayed_skipped: AtomicU64,
    /// Write transactions committed.
    pub transactions: AtomicU64,
    /// Offset commits stored in the database.
    pub offset_commits: AtomicU64,
    /// Database errors met by writers and committers (each followed by a retry).
    pub database_errors: AtomicU64,
    /// Highest epoch known durable everywhere.
    pub durable_epoch: AtomicU64,
    /// Messages behind the partition ends, summed over this process's partitions.
    pub lag: AtomicI64,
    /// Some source is held back by the in-flight bound (the database is behind).
    pub backpressured: AtomicBool,
    /// Some writer is waiting for the database to come back.
    pub database_waiting: AtomicBool,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
