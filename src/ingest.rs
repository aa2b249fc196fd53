//! One worker of the ingest job: the start-up agreements (which job holds the topic, whether
//! the committed offsets still fit it, where each partition starts), then the dataflow of
//! the `dataflows` crate with Kafka and PostgreSQL plugged in:
//!
//! - the partition reader: [`crate::kafka::source::KafkaSource`];
//! - an epoch writer per database connection: [`crate::sink::writer`]'s task;
//! - the offset committer: [`crate::sink::offsets::Committer`];
//! - the observer: the process's [`Stats`].
//!
//! docs/architecture.md has the picture.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fleetflow_dataflows::routing::owned_partitions;
use fleetflow_dataflows::{Durable, EpochWriter, Ingest, IngestSettings, Observer, OffsetCommitter, SinkShape, Turn};
use timely::worker::Worker;

use crate::alerts::WorkerAlerts;
use crate::config::{JobConfig, StartFrom};
use crate::context::IngestContext;
use crate::envelope::Envelope;
use crate::kafka::consumer::StartOffset;
use crate::kafka::source::KafkaSource;
use crate::kafka::topic_watch::{check_topic, TopicCheck};
use crate::record::now_ms;
use crate::sink::offsets::{load_offsets, pin_start_offsets, Committer, CommitterSettings, Landmarks};
use crate::sink::watermarks::FnvWatermarks;
use crate::sink::writer::{spawn_writer, EpochWrite, WriterSettings};
use crate::stats::Stats;

/// Runs the ingest dataflow on one worker until shutdown or, with `--exit-when-idle`, until
/// its partitions are drained and committed.
pub fn run_worker(worker: &mut Worker, ctx: &IngestContext) -> anyhow::Result<()> {
    let (index, peers) = (worker.index(), worker.peers());
    let config = &ctx.config;
    // First of all: make sure no other copy of the job writes this topic.
    let generation = agree_on_generation(worker, ctx)?;
    // Then: do the committed offsets still fit the topic? (a barrier: see topic_watch)
    let checked = check_topic(worker, ctx, generation)?;
    let partitions = owned_partitions(index, peers, ctx.partitions);
    let (starts, fnv) = resolve_starts(config, &partitions, &ctx.runtime, &checked)?;
    tracing::info!(worker = index, ?partitions, ?starts, "worker starting");
    // A message read below each committed offset, stored with it (kafka::landmarks).
    let landmarks = Arc::new(Landmarks::default());
    if !fnv.is_empty() {
        tracing::info!(
            worker = index,
            "replaying messages a job of a version before schema 7 wrote: each is checked against its old watermark"
        );
    }
    let reader = KafkaSource::open(ctx, (index, peers), &starts, &checked, landmarks.clone(), fnv)?;
    // The alert rules' dataflow comes before the ingest dataflow, on every worker.
    let (mut alerts, alert_tap) = match WorkerAlerts::start(worker, config, generation, &ctx.runtime)? {
        Some((alerts, tap)) => (Some(alerts), Some(tap)),
        None => (None, None),
    };

    // One worker leaves the database idle while it prepares each transaction; several
    // workers keep it busy already (measured: see the README's performance section).
    let connections = config.sink.connections.unwrap_or(if peers == 1 { 2 } else { 1 });
    let writer = WriterSettings {
        database_url: config.database.url.clone(),
        topic: config.kafka.topic.clone(),
        worker: index,
        workers: peers,
        connection: 0,
        connections,
        audit_run: config.sink.audit.then(|| ctx.run_id.clone()),
        natural_key: ctx.natural_key,
        rollups: config.sink.rollups,
        generation,
        timeout: config.sink.timeout,
        alerts: alert_tap,
    };
    let make_writer = |connection, durable: Durable| {
        let settings = WriterSettings { connection, ..writer.clone() };
        PostgresWriter(spawn_writer(&ctx.runtime, settings, ctx.stats.clone(), move |epoch| durable.epoch(epoch)))
    };
    let committer = Committer::spawn(
        &ctx.runtime,
        CommitterSettings {
            database_url: config.database.url.clone(),
            topic: config.kafka.topic.clone(),
            generation,
            timeout: config.sink.timeout,
            landmarks,
        },
        ctx.stats.clone(),
    );
    let settings = IngestSettings {
        epoch_records: config.epochs.records,
        epoch_bytes: config.epochs.bytes,
        epoch_interval: config.epochs.interval,
        max_epochs_in_flight: config.epochs.max_in_flight,
        // This worker's share of the process's byte bound.
        max_bytes_in_flight: (config.epochs.max_bytes_in_flight / config.cluster.workers.max(1)).max(1),
        sink: SinkShape { batch_size: config.sink.batch_size, connections },
        commit_interval: config.commit_interval,
        exit_when_idle: config.exit_when_idle,
    };
    let observer = StatsObserver::new(&ctx.stats);
    let mut ingest = Ingest::new(worker, settings, reader, committer, make_writer, observer);
    while !ctx.shutdown.load(Ordering::Relaxed) {
        if let Some(alerts) = &mut alerts {
            alerts.turn(ingest.durable_reading(now_ms().max(0) as u64));
        }
        if ingest.turn(worker).map_err(|stop| anyhow::anyhow!(stop.0))? == Turn::Idle {
            break;
        }
    }
    let (_, observer) = ingest.finish(worker);
    if let Some(alerts) = alerts {
        alerts.finish(worker, config.shutdown_timeout);
    }
    if let Ok(mut total) = ctx.stats.latency.lock() {
        let _ = total.add(&observer.latency);
    }
    tracing::info!(worker = index, "worker finished; everything it read is durable and committed");
    Ok(())
}

/// Another copy of the job holds the topic (or the database could not say who does).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TopicHeld(pub String);

/// The job's fencing generation, the same in every worker: worker 0 takes the topic (see
/// `sink::fence`) and broadcasts the outcome, so a job that is refused stops in every
/// process with the same line, and no process can pick up another job's generation.
fn agree_on_generation(worker: &mut Worker, ctx: &IngestContext) -> anyhow::Result<i64> {
    let config = &ctx.config;
    // (generation, or -1 when another job holds the topic / -2 on any other error, with the
    // line saying why not)
    let outcome: Option<(i64, String)> = (worker.index() == 0).then(|| {
        let holder = crate::sink::fence::describe_holder(&config.group);
        let url = &config.database.url;
        let acquired = ctx.runtime.block_on(crate::sink::fence::acquire(
            url,
            &config.kafka.topic,
            &holder,
            config.topic.take_over,
        ));
        match acquired {
            Ok(generation) => (generation, String::new()),
            Err(crate::sink::SinkError::Fenced(line)) => (-1, line),
            Err(e) => (-2, e.to_string()),
        }
    });
    match fleetflow_dataflows::from_first_worker::from_first_worker(worker, outcome) {
        Some((generation, _)) if generation >= 0 => Ok(generation),
        Some((-1, line)) => Err(TopicHeld(line).into()),
        Some((_, line)) => Err(anyhow::anyhow!(line)),
        None => Err(anyhow::anyhow!("worker 0 announced no fencing generation")),
    }
}

/// Where each owned partition starts: the committed offset (past what retention deleted), or
/// `--start` on the job's very first run (any other partition without a committed offset
/// was added to the topic later: earliest). A `latest` start is pinned in the database
/// first, so a crash before the first commit cannot move it. Also returns the old
/// watermarks (`FnvWatermarks`) of the messages those starts may read again.
fn resolve_starts(
    config: &JobConfig,
    partitions: &[i32],
    runtime: &tokio::runtime::Handle,
    checked: &TopicCheck,
) -> anyhow::Result<(Vec<(i32, StartOffset)>, FnvWatermarks)> {
    let (url, topic) = (&config.database.url, &config.kafka.topic);
    let (committed, mut fnv) = runtime.block_on(async {
        let client = crate::sink::connect(url).await?;
        Ok::<_, crate::sink::SinkError>((
            load_offsets(&client, topic).await?,
            FnvWatermarks::load(&client, topic).await?,
        ))
    })?;
    let mut starts = Vec::new();
    let mut to_pin = Vec::new();
    for &p in partitions {
        let start = match (committed.get(&p), checked.start_for_uncommitted(config.topic.start)) {
            (Some(next), _) => StartOffset::At(checked.resume_at(p, *next)),
            (None, StartFrom::Earliest) => StartOffset::Earliest,
            (None, StartFrom::Latest) => {
                let end = crate::kafka::admin::end_offset(&config.kafka, p)?;
                to_pin.push((p, end));
                StartOffset::At(end)
            }
        };
        starts.push((p, start));
    }
    if !to_pin.is_empty() {
        // Another process may have pinned first; use what the database holds afterwards.
        let committed = runtime.block_on(async {
            let client = crate::sink::connect(url).await?;
            pin_start_offsets(&client, topic, &to_pin).await?;
            load_offsets(&client, topic).await
        })?;
        for (p, start) in &mut starts {
            if let Some(next) = committed.get(p) {
                *start = StartOffset::At(*next);
            }
        }
    }
    fnv.keep_replays(
        &starts.iter().map(|(p, s)| (*p, if let StartOffset::At(o) = s { Some(*o) } else { None })).collect::<Vec<_>>(),
    );
    Ok((starts, fnv))
}

/// The epoch writer of one database connection: a handle on its writer task.
struct PostgresWriter(tokio::sync::mpsc::UnboundedSender<EpochWrite>);

impl EpochWriter<Envelope> for PostgresWriter {
    fn write(&mut self, epoch: u64, batches: Vec<Vec<Envelope>>) {
        // The task lives as long as this handle; a send fails only in process teardown.
        let _ = self.0.send(EpochWrite { epoch, batches });
    }
}

impl OffsetCommitter for Committer {
    fn commit(&mut self, offsets: Vec<(i32, i64)>) -> u64 {
        Committer::commit(self, offsets)
    }
    fn done(&self) -> u64 {
        Committer::done(self)
    }
}

/// Feeds the process's metrics from one worker.
struct StatsObserver<'a> {
    stats: &'a Stats,
    held_back: bool,
    /// Produce-to-durable latency of this worker's records, in milliseconds.
    latency: hdrhistogram::Histogram<u64>,
}

impl<'a> StatsObserver<'a> {
    fn new(stats: &'a Stats) -> Self {
        StatsObserver { stats, held_back: false, latency: crate::stats::latency_histogram() }
    }
}

impl Observer for StatsObserver<'_> {
    fn records_read(&mut self, n: usize) {
        Stats::add(&self.stats.records_read, n as u64);
    }
    fn epochs(&mut self, durable: u64, open: u64) {
        self.stats.durable_epoch.fetch_max(durable, Ordering::Relaxed);
        self.stats.newest_epoch.fetch_max(open, Ordering::Relaxed);
    }
    fn backpressured(&mut self, held: bool) {
        self.stats.backpressured.set(&mut self.held_back, held);
    }
    fn epoch_durable(&mut self, produced_ms: &[i64]) {
        let now = now_ms();
        for produced in produced_ms {
            self.latency.saturating_record((now - produced).max(1) as u64);
        }
        Stats::add(&self.stats.epochs_durable, 1);
    }
}
