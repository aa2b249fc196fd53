//! What the workers of one process share: the checked configuration, the I/O runtime, the
//! metrics and the shutdown flag. Made once by `job`, read by every room of the ingest path.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::JobConfig;
use crate::stats::Stats;

/// Everything a worker needs, shared by the workers of a process.
pub struct IngestContext {
    pub config: JobConfig,
    pub partitions: i32,
    pub runtime: tokio::runtime::Handle,
    pub stats: Arc<Stats>,
    pub shutdown: Arc<AtomicBool>,
    /// Identifies this run in the audit table.
    pub run_id: String,
    /// Whether rows are deduplicated on (serverId, time) (see `--dedup`).
    pub natural_key: bool,
}
