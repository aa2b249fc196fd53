//! Launches the ingest job: checks the flags, Kafka and the database up front (so a mistake
//! is one clear line, not a stuck worker), then runs the timely workers of this process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::RunArgs;
use crate::exit::{exit_with, Exit};
use crate::ingest::{run_worker, IngestContext};
use crate::stats::Stats;

/// Runs `fleetflow run` to completion (shutdown signal or `--exit-when-idle`).
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    install_panic_hook();
    let timely_config = crate::config::timely_config(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fleetflow-io")
        .enable_all()
        .build()
        .context("cannot start the I/O runtime")?;

    let partitions = crate::kafka::admin::partition_count(&args.kafka)?;
    let url = args.database.database_url.clone();
    let want_natural_key = args.dedup == crate::cli::Dedup::NaturalKey;
    let (version, natural_key) = runtime.block_on(async {
        let mut client = crate::sink::connect(&url).await?;
        let version = crate::sink::schema::migrate(&mut client, &url).await?;
        let natural_key = crate::sink::schema::natural_key_index(&client, want_natural_key).await?;
        crate::sink::rollups::set_silent_after(&client, args.silent_after).await?;
        Ok::<_, crate::sink::SinkError>((version, natural_key))
    })?;
    if natural_key && !want_natural_key {
        tracing::warn!("metrics has the natural-key unique index from an earlier --dedup natural-key run; deduplicating on (server_id, time)");
    }
    tracing::info!(
        topic = %args.kafka.topic, partitions, schema_version = version,
        process = args.process_id, processes = args.processes, workers_per_process = args.workers,
        "starting the ingest job"
    );

    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // A second signal while shutting down exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, shutdown.clone())?;
        signal_hook::flag::register(signal, shutdown.clone())?;
    }
    spawn_shutdown_watchdog(shutdown.clone(), args.shutdown_timeout);

    let stats = Arc::new(Stats::default());
    if let Some(listen) = &args.metrics_listen {
        runtime.block_on(crate::metrics::serve(listen, stats.clone()))?;
    }
    if let (Some(retain), 0) = (args.retain, args.process_id) {
        runtime.spawn(apply_retention(args.database.database_url.clone(), retain));
    }
    let started = Instant::now();
    let reporter_stop = Arc::new(AtomicBool::new(false));
    let reporter = spawn_reporter(stats.clone(), args.report_interval, reporter_stop.clone());

    let run_id = format!("{}-p{}", crate::record::now_ms(), args.process_id);
    let ctx = Arc::new(IngestContext {
        limits: crate::config::limits(&args),
        args,
        partitions,
        runtime: runtime.handle().clone(),
        stats: stats.clone(),
        shutdown,
        run_id,
        natural_key,
    });
    let connected = Arc::new(AtomicBool::new(false));
    if ctx.args.processes > 1 && !ctx.args.connect_timeout.is_zero() {
        spawn_connect_watchdog(connected.clone(), ctx.args.connect_timeout);
    }
    let guards = timely::execute(timely_config, move |worker| {
        if let Err(e) = run_worker(worker, &ctx) {
            // The other workers cannot finish without this one: stop the process.
            let exit = if e.is::<crate::ingest::TopicHeld>() { Exit::Fenced } else { Exit::Error };
            exit_with(exit, &format!("worker {}: {}", worker.index(), crate::one_line(&e)));
        }
    })
    .map_err(|e| anyhow::anyhow!("cannot start the timely workers: {e}"))?;
    // timely returns once every process of the job is connected.
    connected.store(true, Ordering::Relaxed);
    for result in guards.join() {
        result.map_err(|e| anyhow::anyhow!("a worker failed: {e}"))?;
    }
    reporter_stop.store(true, Ordering::Relaxed);
    let _ = reporter.join();

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
    Ok(())
}

/// After a shutdown signal, gives the workers `timeout` to make their open epochs durable,
/// then exits anyway: what was not committed is read again on the next start.
fn spawn_shutdown_watchdog(shutdown: Arc<AtomicBool>, timeout: Duration) {
    std::thread::spawn(move || {
        while !shutdown.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::info!(timeout = ?timeout, "shutting down: finishing the open epochs");
        std::thread::sleep(timeout);
        tracing::warn!("shutdown timed out; abandoning epochs that are not durable (they will be re-read on restart)");
        std::process::exit(Exit::Ok.code());
    });
}

/// Until the other processes of the job connect, timely waits for them without end; a
/// process whose peers never come (a wrong host list, a process not started) says so and
/// exits instead.
fn spawn_connect_watchdog(connected: Arc<AtomicBool>, timeout: Duration) {
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        while !connected.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !connected.load(Ordering::Relaxed) {
            exit_with(
                Exit::LostPeer,
                &format!(
                    "the other processes of the job did not connect within {}; start every process with the \
                     same --hosts/--hostfile, --processes and --workers, each with its own --process-id",
                    humantime::format_duration(timeout)
                ),
            );
        }
    });
}

/// Prints one progress line every `interval`.
fn spawn_reporter(stats: Arc<Stats>, interval: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut last = (Instant::now(), 0u64);
        while !stop.load(Ordering::Relaxed) {
            let deadline = Instant::now() + interval;
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let read = Stats::get(&stats.records_read);
            let rate = (read - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
            last = (Instant::now(), read);
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
    })
}

/// Turns a panic into one line and an exit. The usual one: another process of the job died,
/// and timely's network threads panic on the broken connection. Nothing is lost (what was
/// not committed is read again); the whole job has to be restarted.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        // The network threads panic with this message; the worker threads, which may notice
        // first, panic inside timely's communication crate with a less telling one.
        let in_communication = info.location().is_some_and(|l| l.file().contains("timely_communication"));
        if message.contains("timely communication error") || in_communication {
            exit_with(
                Exit::LostPeer,
                &format!(
                    "lost the connection to another process of the job ({message}); stopping. Restart every \
                     process of the job: uncommitted records are read again, nothing is lost."
                ),
            );
        }
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        exit_with(
            Exit::Internal,
            &format!("internal error in thread {thread}: {message}{location}; stopping (please report this)"),
        );
    }));
}

/// With `--retain`, process 0 drops raw chunks older than the retention every hour.
async fn apply_retention(url: String, retain: Duration) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        every.tick().await;
        match crate::ops::drop_old_chunks(&url, retain).await {
            Ok(n) => {
                tracing::info!(dropped_chunks = n, retain = %humantime::format_duration(retain), "retention applied")
            }
            Err(e) => tracing::warn!(error = %crate::one_line(&e), "retention failed; retrying in an hour"),
        }
    }
}
