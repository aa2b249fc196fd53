//! Counters shared by the workers of one process, read by the progress report (and later
//! the /metrics endpoint). Plain atomics: cheap enough to bump per batch.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub partition: i32,
}

#[derive(Debug)]
pub struct Stats {
    /// When the process started (rates are measured from here).
    pub started: Instant,
    /// Milliseconds from `started` to the last committed write.
    pub last_write_ms: AtomicU64,
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
    /// Rows not written because their (serverId, time) was already stored (`--dedup natural-key`).
    pub natural_key_duplicates: AtomicU64,
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
    /// Sources held back by the in-flight bound (the database is behind).
    pub backpressured: InState,
    /// Writers waiting for the database to come back.
    pub database_waiting: InState,
    /// Writers whose database stopped answering within `--database-timeout` (a hung server
    /// or session), until their next write commits.
    pub database_not_answering: InState,
    /// Records that passed validation but that the database refused (dead-lettered).
    pub rejected_by_database: AtomicU64,
    /// Highest epoch a source of this process has opened.
    pub newest_epoch: AtomicU64,
    /// Epochs that became durable (counted by each worker as its durable frontier moves).
    pub epochs_durable: AtomicU64,
    /// Dead letters by reason (`DecodeError::kind`).
    pub dead_letters_by_reason: Family<KindLabels, Counter>,
    /// Messages behind the end, per partition.
    pub partition_lag: Family<PartitionLabels, Gauge>,
    /// Times a partition was found stalled (messages to read, none delivered).
    pub partition_stalls: Family<PartitionLabels, Counter>,
    /// 1 while a partition is stalled.
    pub partition_stalled: Family<PartitionLabels, Gauge>,
    /// Why each stalled partition of this process is stalled, for /healthz.
    pub stalled: std::sync::Mutex<std::collections::BTreeMap<i32, String>>,
    /// Offsets deleted by retention before the job read them, per partition.
    pub skipped_offsets: Family<PartitionLabels, Counter>,
    /// Write transaction durations.
    pub copy_seconds: Histogram,
    /// Produce-to-durable latency (ms) of every record, merged from the workers at exit.
    pub latency: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            last_write_ms: AtomicU64::new(0),
            records_read: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            rows_written: AtomicU64::new(0),
            dead_letters_written: AtomicU64::new(0),
            replayed_skipped: AtomicU64::new(0),
            natural_key_duplicates: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            offset_commits: AtomicU64::new(0),
            database_errors: AtomicU64::new(0),
            durable_epoch: AtomicU64::new(0),
            lag: AtomicI64::new(0),
            backpressured: InState::default(),
            database_waiting: InState::default(),
            database_not_answering: InState::default(),
            rejected_by_database: AtomicU64::new(0),
            newest_epoch: AtomicU64::new(0),
            epochs_durable: AtomicU64::new(0),
            dead_letters_by_reason: Family::default(),
            partition_lag: Family::default(),
            partition_stalls: Family::default(),
            partition_stalled: Family::default(),
            stalled: Default::default(),
            skipped_offsets: Family::default(),
            copy_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            latency: std::sync::Mutex::new(latency_histogram()),
        }
    }
}

impl Stats {
    /// Notes that a write just committed.
    pub fn mark_write(&self) {
        self.last_write_ms.fetch_max(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    /// Time from start to the last committed write.
    pub fn active(&self) -> Duration {
        Duration::from_millis(self.last_write_ms.load(Relaxed))
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}

/// An empty produce-to-durable latency histogram: 1 ms to an hour, 2 significant digits (the
/// workers' and the process's total, so they can be added).
pub fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 2).expect("valid histogram bounds")
}

/// CPU seconds (user + system) this process has used, from /proc (Linux).
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

/// Peak resident memory of this process, in MiB, from /proc (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// How many of a process's sources or writers are in some state (held back, waiting). Each
/// reports its own changes, so one that recovers does not hide another still waiting.
#[derive(Debug, Default)]
pub struct InState(AtomicUsize);

impl InState {
    /// Records that the caller, whose last reported state is `mine`, is now in state `now`.
    pub fn set(&self, mine: &mut bool, now: bool) {
        if *mine != now {
            if now {
                self.0.fetch_add(1, Relaxed);
            } else {
                self.0.fetch_sub(1, Relaxed);
            }
            *mine = now;
        }
    }

    /// Whether any caller is in the state.
    pub fn any(&self) -> bool {
        self.0.load(Relaxed) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_state_counts_each_caller_once_until_all_have_left() {
        let waiting = InState::default();
        let (mut a, mut b) = (false, false);
        waiting.set(&mut a, true);
        waiting.set(&mut a, true);
        waiting.set(&mut b, true);
        waiting.set(&mut a, false);
        assert!(waiting.any(), "b still waits");
        waiting.set(&mut b, false);
        waiting.set(&mut b, false);
        assert!(!waiting.any());
    }
}
