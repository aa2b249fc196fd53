//! Launches the ingest job: checks the flags, Kafka and the database up front (so a mistake
//! is one clear line, not a stuck worker), then runs the timely workers of this process.
//! Signals, watchdogs and the panic hook are `lifecycle`'s; the progress line and the run
//! summary `report`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::{Dedup, JobConfig};
use crate::context::IngestContext;
use crate::exit::{exit_with, Exit};
use crate::ingest::{run_worker, TopicHeld};
use crate::lifecycle::{ConnectWatchdog, Shutdown};
use crate::report::{Reporter, RunReport};
use crate::stats::Stats;

/// Runs `fleetflow run` to completion (shutdown signal or `--exit-when-idle`).
pub fn run(config: JobConfig) -> anyhow::Result<()> {
    crate::lifecycle::install_panic_hook();
    // First: a summary file from an earlier run is replaced at once, and from here on every
    // exit leaves this run's final summary.
    let report = RunReport::create(&config)?;
    crate::exit::on_exit({
        let report = report.clone();
        move |exit| report.finish(exit)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fleetflow-io")
        .enable_all()
        .build()
        .context("cannot start the I/O runtime")?;

    let partitions = crate::kafka::admin::partition_count(&config.kafka)?;
    let (version, natural_key) = runtime.block_on(prepare_database(&config))?;
    tracing::info!(
        topic = %config.kafka.topic, partitions, schema_version = version,
        process = config.cluster.process_id, processes = config.cluster.processes,
        workers_per_process = config.cluster.workers,
        "starting the ingest job"
    );

    let shutdown = Shutdown::on_signals_second_exits()?;
    shutdown.spawn_watchdog(config.shutdown_timeout);

    let stats = Arc::new(Stats::default());
    if let Some(listen) = &config.metrics_listen {
        runtime.block_on(crate::metrics::serve(listen, stats.clone()))?;
    }
    if let (Some(retain), 0) = (config.sink.retain, config.cluster.process_id) {
        runtime.spawn(apply_retention(config.database.url.clone(), retain));
    }
    report.attach(stats.clone(), Instant::now());
    let reporter = Reporter::spawn(stats.clone(), config.report_interval, report.clone());

    let run_id = format!("{}-p{}", crate::record::now_ms(), config.cluster.process_id);
    let connect_watchdog = ConnectWatchdog::start(config.cluster.processes, config.cluster.connect_timeout);
    let timely_config = config.cluster.timely();
    let shutdown = shutdown.flag();
    let ctx = Arc::new(IngestContext {
        config,
        partitions,
        runtime: runtime.handle().clone(),
        stats: stats.clone(),
        shutdown,
        run_id,
        natural_key,
    });
    let guards = timely::execute(timely_config, move |worker| {
        if let Err(e) = run_worker(worker, &ctx) {
            // The other workers cannot finish without this one: stop the process.
            let exit = if e.is::<TopicHeld>() { Exit::Fenced } else { Exit::Error };
            exit_with(exit, &format!("worker {}: {}", worker.index(), crate::one_line(&e)));
        }
    })
    .map_err(|e| anyhow::anyhow!("cannot start the timely workers: {e}"))?;
    // timely returns once every process of the job is connected.
    connect_watchdog.connected();
    for result in guards.join() {
        result.map_err(|e| anyhow::anyhow!("a worker failed: {e}"))?;
    }
    reporter.stop();

    let summary = report.summary(Some(Exit::Ok));
    crate::report::log_finished(&summary);
    report.write_final(&summary)?;
    Ok(())
}

/// Migrates the schema, sets up the natural-key index if `--dedup natural-key` asks for it
/// (or finds it from an earlier run) and the rollups' settings. Returns the schema version
/// and whether rows are deduplicated on the natural key.
async fn prepare_database(config: &JobConfig) -> Result<(i32, bool), crate::sink::SinkError> {
    let url = &config.database.url;
    let want_natural_key = config.sink.dedup == Dedup::NaturalKey;
    let mut client = crate::sink::connect(url).await?;
    let version = crate::sink::schema::migrate(&mut client, url).await?;
    let natural_key = crate::sink::schema::natural_key_index(&client, want_natural_key).await?;
    crate::sink::rollups::set_silent_after(&client, config.sink.silent_after).await?;
    if natural_key && !want_natural_key {
        tracing::warn!("metrics has the natural-key unique index from an earlier --dedup natural-key run; deduplicating on (server_id, time)");
    }
    Ok((version, natural_key))
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
