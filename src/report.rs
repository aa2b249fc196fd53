//! What a job process tells about its run: the progress line every `--report-interval`, the
//! "job finished" line at the end (both for people), and the same figures as a JSON object
//! for programs: `run --summary-json FILE`, rewritten at every report while the job runs
//! (`"finished": false`) and a last time when the process ends (`"finished": true` with its
//! exit code). The benchmark, the demo and the tests read that file, never the log lines.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::JobConfig;
use crate::exit::Exit;
use crate::stats::Stats;

/// The `version` of the [`RunSummary`] this build writes and reads.
pub const SUMMARY_VERSION: u32 = 1;

/// One job process's run, as `--summary-json` writes it. Counts are this process's, since it
/// started; add them up over the processes of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The format: [`SUMMARY_VERSION`]. A new field keeps the version; a changed or removed
    /// one bumps it.
    pub version: u32,
    /// false while the job runs, true once the process has ended.
    pub finished: bool,
    /// The process's exit code (see README, "Exit codes"), once finished.
    pub exit_code: Option<i32>,
    pub process_id: usize,
    pub processes: usize,
    /// Worker threads of this process.
    pub workers: usize,
    /// Messages taken from Kafka.
    pub records_read: u64,
    /// Metric rows committed to the database.
    pub rows_written: u64,
    /// Dead letters committed to the database.
    pub dead_letters: u64,
    /// Replayed messages dropped because the exactly-once watermarks showed them written.
    pub replayed_skipped: u64,
    /// Rows dropped by `--dedup natural-key`.
    pub natural_key_duplicates: u64,
    /// Seconds since the job started working (after its start-up checks).
    pub seconds: f64,
    /// Seconds from the start of the process's work to its last committed write: what the
    /// rates are measured over (it leaves out the wait of `--exit-when-idle`).
    pub active_seconds: f64,
    /// CPU seconds (user + system) of the process; null where /proc cannot tell.
    pub cpu_seconds: Option<f64>,
    /// Peak resident memory of the process, in MiB; null where /proc cannot tell.
    pub peak_rss_mib: Option<f64>,
    /// Produce-to-durable latency of the records, in ms (0 until the workers finish: they
    /// merge their histograms at the end).
    pub latency_p50_ms: u64,
    pub latency_p99_ms: u64,
    /// rows_written / active_seconds.
    pub rows_per_second: f64,
    /// Highest epoch durable everywhere.
    pub durable_epoch: u64,
    /// Messages behind the partition ends, over this process's partitions.
    pub lag: i64,
    /// A writer is waiting for the database to come back.
    pub waiting_for_database: bool,
    /// A source is held back because the database is behind.
    pub backpressured: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write --summary-json {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read the run summary {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the run summary {path} is not one: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("the run summary {path} has version {found}; this build reads version {SUMMARY_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

impl RunSummary {
    /// Reads a summary file that `run --summary-json` wrote.
    pub fn read(path: &Path) -> Result<RunSummary, ReportError> {
        let bytes = std::fs::read(path).map_err(|source| ReportError::Read { path: path.to_owned(), source })?;
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let parse = |source| ReportError::Parse { path: path.to_owned(), source };
        let Version { version } = serde_json::from_slice(&bytes).map_err(parse)?;
        if version != SUMMARY_VERSION {
            return Err(ReportError::Version { path: path.to_owned(), found: version });
        }
        serde_json::from_slice(&bytes).map_err(parse)
    }

    /// Writes the summary to `path` atomically: a reader sees the previous file or this one,
    /// never a part (a temporary file beside it, synced, then renamed over it).
    pub fn write(&self, path: &Path) -> Result<(), ReportError> {
        use std::io::Write;
        let failed = |source| ReportError::Write { path: path.to_owned(), source };
        let name = path.file_name().ok_or_else(|| failed(std::io::ErrorKind::InvalidInput.into()))?;
        let temp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| failed(e.into()))?;
        text.push(b'\n');
        let written = std::fs::File::create(&temp)
            .and_then(|mut file| file.write_all(&text).and_then(|()| file.sync_all()))
            .and_then(|()| std::fs::rename(&temp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written.map_err(failed)
    }
}

/// The figures of one job process, collected into [`RunSummary`]s and written to its
/// `--summary-json` file, if it has one. Shared by the job, the reporter and the last words.
#[derive(Debug)]
pub struct RunReport {
    path: Option<PathBuf>,
    process: (usize, usize, usize),
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The process's counters and when its work started, once it started.
    work: Option<(Arc<Stats>, Instant)>,
    /// The final summary is written: nothing is written after it.
    finished: bool,
}

impl RunReport {
    /// The report of the job `config` describes. With `--summary-json`, writes a first
    /// summary (all zero) at once, so a file from an earlier run never passes for this one's
    /// and an unwritable path is found before the job starts.
    pub fn create(config: &JobConfig) -> Result<Arc<RunReport>, ReportError> {
        let c = &config.cluster;
        let report = RunReport {
            path: config.summary_json.clone(),
            process: (c.process_id, c.processes, c.workers),
            state: Mutex::default(),
        };
        if let Some(path) = &report.path {
            report.summary(None).write(path)?;
        }
        Ok(Arc::new(report))
    }

    /// The job started working at `started`, counting in `stats`.
    pub fn attach(&self, stats: Arc<Stats>, started: Instant) {
        self.lock().work = Some((stats, started));
    }

    /// The figures now; `exit` is the process's exit, when it is ending.
    pub fn summary(&self, exit: Option<Exit>) -> RunSummary {
        let work = self.lock().work.clone();
        collect(self.process, work.as_ref().map(|(stats, started)| (&**stats, *started)), exit)
    }

    /// Writes `summary` while the job runs; nothing once the final summary is written, or
    /// without `--summary-json`.
    pub fn write_progress(&self, summary: &RunSummary) -> Result<(), ReportError> {
        let state = self.lock();
        match &self.path {
            Some(path) if !state.finished => summary.write(path),
            _ => Ok(()),
        }
    }

    /// Writes the final summary (once; later calls do nothing). Without `--summary-json`,
    /// nothing.
    pub fn write_final(&self, summary: &RunSummary) -> Result<(), ReportError> {
        self.write_final_with(self.lock(), summary)
    }

    /// The process is ending with `exit`, on whatever thread: writes the final summary if it
    /// is not written yet. Waits at most a second for a write under way; says on stderr
    /// (through the log) if it cannot write.
    pub fn finish(&self, exit: Exit) {
        let deadline = Instant::now() + Duration::from_secs(1);
        let state = loop {
            match self.state.try_lock() {
                Ok(state) => break state,
                Err(TryLockError::Poisoned(poisoned)) => break poisoned.into_inner(),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(TryLockError::WouldBlock) => {
                    tracing::warn!("the final run summary was not written: another write did not end in time");
                    return;
                }
            }
        };
        let work = state.work.clone();
        let summary = collect(self.process, work.as_ref().map(|(stats, started)| (&**stats, *started)), Some(exit));
        if let Err(e) = self.write_final_with(state, &summary) {
            tracing::warn!(error = %e, "the final run summary was not written");
        }
    }

    fn write_final_with(&self, mut state: MutexGuard<'_, State>, summary: &RunSummary) -> Result<(), ReportError> {
        match &self.path {
            Some(path) if !state.finished => {
                state.finished = true;
                summary.write(path)
            }
            _ => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The summary of a process `(id, processes, workers)` whose work, if it started, counts in
/// `work`.
fn collect(process: (usize, usize, usize), work: Option<(&Stats, Instant)>, exit: Option<Exit>) -> RunSummary {
    let (process_id, processes, workers) = process;
    // Before the work starts: zeros.
    let idle;
    let (stats, seconds) = match work {
        Some((stats, started)) => (stats, started.elapsed().as_secs_f64()),
        None => {
            idle = Stats::default();
            (&idle, 0.0)
        }
    };
    // Not waiting for the histogram: the summary may be taken on a thread that is ending the
    // process while a worker merges into it.
    let latency = match stats.latency.try_lock() {
        Ok(h) if !h.is_empty() => (h.value_at_quantile(0.5), h.value_at_quantile(0.99)),
        _ => (0, 0),
    };
    let active_seconds = if work.is_some() { stats.active().as_secs_f64() } else { 0.0 };
    let rows_written = Stats::get(&stats.rows_written);
    RunSummary {
        version: SUMMARY_VERSION,
        finished: exit.is_some(),
        exit_code: exit.map(Exit::code),
        process_id,
        processes,
        workers,
        records_read: Stats::get(&stats.records_read),
        rows_written,
        dead_letters: Stats::get(&stats.dead_letters_written),
        replayed_skipped: Stats::get(&stats.replayed_skipped),
        natural_key_duplicates: Stats::get(&stats.natural_key_duplicates),
        seconds,
        active_seconds,
        cpu_seconds: crate::stats::cpu_seconds(),
        peak_rss_mib: crate::stats::peak_rss_mib(),
        latency_p50_ms: latency.0,
        latency_p99_ms: latency.1,
        // The rate counts the time until the last write, not the idle wait before exiting.
        rows_per_second: rows_written as f64 / active_seconds.max(1e-3),
        durable_epoch: Stats::get(&stats.durable_epoch),
        lag: stats.lag.load(Ordering::Relaxed),
        waiting_for_database: stats.database_waiting.any(),
        backpressured: stats.backpressured.any(),
    }
}

/// Logs the "job finished" line of a final summary.
pub fn log_finished(s: &RunSummary) {
    let (rows, active) = (s.rows_written, s.active_seconds);
    tracing::info!(
        records_read = s.records_read,
        rows_written = rows,
        dead_letters = s.dead_letters,
        replayed_skipped = s.replayed_skipped,
        natural_key_duplicates = s.natural_key_duplicates,
        seconds = format!("{:.1}", s.seconds),
        active_seconds = format!("{active:.3}"),
        cpu_seconds = format!("{:.2}", s.cpu_seconds.unwrap_or(f64::NAN)),
        peak_rss_mib = format!("{:.1}", s.peak_rss_mib.unwrap_or(f64::NAN)),
        latency_p50_ms = s.latency_p50_ms,
        latency_p99_ms = s.latency_p99_ms,
        rows_per_second = format!("{:.0}", s.rows_per_second),
        "job finished: {rows} rows written in {active:.2} s of work ({:.0} rows/s)",
        s.rows_per_second
    );
}

/// The thread that logs the progress line every `--report-interval` (and once more when it
/// stops) and rewrites the summary file after each.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Reporter {
    pub fn spawn(stats: Arc<Stats>, interval: Duration, report: Arc<RunReport>) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = (Instant::now(), 0u64);
            let mut write_failed = false;
            while !stopped.load(Ordering::Relaxed) {
                let deadline = Instant::now() + interval;
                while Instant::now() < deadline && !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let read = Stats::get(&stats.records_read);
                let rate = (read - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
                last = (Instant::now(), read);
                log_progress(&stats, read, rate);
                match report.write_progress(&report.summary(None)) {
                    Ok(()) => write_failed = false,
                    // Once per failing stretch, not at every report.
                    Err(e) if !write_failed => {
                        tracing::warn!(error = %e, "the run summary was not rewritten; retrying at the next report");
                        write_failed = true;
                    }
                    Err(_) => {}
                }
            }
        });
        Reporter { stop, thread }
    }

    /// Stops the reporter after its last progress line.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

fn log_progress(stats: &Stats, read: u64, rate: f64) {
    let waiting = match (stats.database_waiting.any(), stats.backpressured.any()) {
        (true, _) => " (waiting for the database)",
        (false, true) => " (backpressure: the database is behind)",
        _ => "",
    };
    tracing::info!(
        records_read = read,
        rate = format!("{rate:.0}"),
        rows_written = Stats::get(&stats.rows_written),
        dead_letters = Stats::get(&stats.dead_letters),
        durable_epoch = Stats::get(&stats.durable_epoch),
        lag = stats.lag.load(Ordering::Relaxed),
        "progress: {read} read ({rate:.0}/s), {} rows written, {} dead letters, {} epochs committed (durable epoch {}), lag {}{waiting}",
        Stats::get(&stats.rows_written),
        Stats::get(&stats.dead_letters),
        Stats::get(&stats.epochs_durable),
        Stats::get(&stats.durable_epoch),
        stats.lag.load(Ordering::Relaxed),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(path: &Path) -> Arc<RunReport> {
        use clap::Parser;
        let cli =
            crate::cli::Cli::try_parse_from(["fleetflow", "run", "-w", "2", "--summary-json", path.to_str().unwrap()])
                .unwrap();
        let crate::cli::Command::Run(args) = cli.command else { panic!("not run") };
        RunReport::create(&JobConfig::from_args(args).unwrap()).unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fleetflow-report-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_summary_is_written_at_start_while_running_and_once_at_the_end() {
        let dir = temp_dir("lifecycle");
        let path = dir.join("summary.json");
        std::fs::write(&path, "stale").unwrap();
        let report = report(&path);
        let first = RunSummary::read(&path).unwrap();
        assert_eq!((first.finished, first.rows_written, first.workers), (false, 0, 2));

        let stats = Arc::new(Stats::default());
        report.attach(stats.clone(), Instant::now());
        Stats::add(&stats.rows_written, 500);
        stats.mark_write();
        report.write_progress(&report.summary(None)).unwrap();
        assert_eq!(RunSummary::read(&path).unwrap().rows_written, 500);

        Stats::add(&stats.rows_written, 500);
        report.write_final(&report.summary(Some(Exit::Ok))).unwrap();
        // Nothing overwrites the final summary: not the reporter, not a later exit.
        Stats::add(&stats.rows_written, 1);
        report.write_progress(&report.summary(None)).unwrap();
        report.finish(Exit::Error);
        let last = RunSummary::read(&path).unwrap();
        assert_eq!((last.finished, last.exit_code, last.rows_written), (true, Some(0), 1000));
        // Only the file itself is left: the temporary files were renamed.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn an_ending_process_writes_its_exit_code() {
        let path = temp_dir("exit").join("summary.json");
        report(&path).finish(Exit::Fenced);
        let summary = RunSummary::read(&path).unwrap();
        assert_eq!((summary.finished, summary.exit_code), (true, Some(4)));
    }

    #[test]
    fn the_format_is_versioned_and_unknown_fields_are_ignored() {
        let dir = temp_dir("version");
        let path = dir.join("summary.json");
        report(&path);
        let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(value["version"], 1);
        for key in ["records_read", "rows_written", "dead_letters", "active_seconds", "latency_p99_ms", "process_id"] {
            assert!(value.get(key).is_some(), "{key} missing: {value}");
        }
        value["a_later_field"] = serde_json::json!(true);
        std::fs::write(&path, value.to_string()).unwrap();
        RunSummary::read(&path).unwrap();
        value["version"] = serde_json::json!(2);
        std::fs::write(&path, value.to_string()).unwrap();
        let err = RunSummary::read(&path).unwrap_err();
        assert!(err.to_string().contains("has version 2"), "{err}");
    }

    #[test]
    fn an_unwritable_path_is_one_clear_error() {
        let dir = temp_dir("unwritable");
        let path = dir.join("no-such-dir").join("summary.json");
        let err = collect((0, 1, 1), None, None).write(&path).unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot write --summary-json {}", path.display())), "{err}");
    }
}
