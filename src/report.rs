//! What a job process tells about its run, for people: the progress line every
//! `--report-interval` and the "job finished" line at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stats::Stats;

/// Logs the "job finished" line: this process's totals since its work started at `started`.
pub fn log_finished(stats: &Stats, started: Instant) {
    let latency = stats
        .latency
        .lock()
        .map(|h| if h.is_empty() { (0, 0) } else { (h.value_at_quantile(0.5), h.value_at_quantile(0.99)) })
        .unwrap_or((0, 0));
    // The rate counts the time until the last write, not the idle wait before exiting.
    let active = stats.active().as_secs_f64();
    let rows = Stats::get(&stats.rows_written);
    tracing::info!(
        records_read = Stats::get(&stats.records_read),
        rows_written = rows,
        dead_letters = Stats::get(&stats.dead_letters_written),
        replayed_skipped = Stats::get(&stats.replayed_skipped),
        natural_key_duplicates = Stats::get(&stats.natural_key_duplicates),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        active_seconds = format!("{active:.3}"),
        cpu_seconds = format!("{:.2}", crate::stats::cpu_seconds().unwrap_or(f64::NAN)),
        peak_rss_mib = format!("{:.1}", crate::stats::peak_rss_mib().unwrap_or(f64::NAN)),
        latency_p50_ms = latency.0,
        latency_p99_ms = latency.1,
        rows_per_second = format!("{:.0}", rows as f64 / active.max(1e-3)),
        "job finished: {rows} rows written in {active:.2} s of work ({:.0} rows/s)",
        rows as f64 / active.max(1e-3)
    );
}

/// The thread that logs the progress line every `--report-interval` (and once more when it
/// stops).
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Reporter {
    pub fn spawn(stats: Arc<Stats>, interval: Duration) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = (Instant::now(), 0u64);
            while !stopped.load(Ordering::Relaxed) {
                let deadline = Instant::now() + interval;
                while Instant::now() < deadline && !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let read = Stats::get(&stats.records_read);
                let rate = (read - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
                last = (Instant::now(), read);
                log_progress(&stats, read, rate);
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
