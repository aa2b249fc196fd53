//! The ingest dataflow, as in docs/architecture.md:
//!
//! ```text
//! source (this worker's Kafka partitions, decoded, stamped with an epoch)
//!   -> exchange by key group of serverId -> batch -> durable sink (COPY + watermarks)
//!   -> probe: the durable frontier -> commit offsets of epochs behind it
//! ```
//!
//! The source and the commit step run in the worker's own loop around the dataflow: the
//! loop reads Kafka into an input handle, and reads the probe to learn what is durable.
//!
//! Epochs: a source closes its epoch after `--epoch-records` records or `--epoch-interval`,
//! and may run at most `--max-epochs-in-flight` epochs ahead of the durable frontier, which
//! bounds what is buffered (backpressure). A source with nothing to read moves its epoch up
//! to that bound, so an idle partition never holds the frontier back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};
use timely::worker::Worker;

use super::operators::durable_sink::WriteDurably;
use super::topic_watch::{check_topic, PartitionWatch, TopicCheck};
use crate::cli::{RunArgs, StartFrom};
use crate::envelope::Envelope;
use crate::kafka::consumer::{PartitionReader, Polled, StartOffset};
use crate::kafka::watch::{OffsetWatch, TopicReset};
use crate::partitioning::owned_partitions;
use crate::record::{decode, now_ms, Limits};
use crate::sink::offsets::{load_offsets, pin_start_offsets, Committer, CommitterSettings};
use crate::sink::writer::WriterSettings;
use crate::stats::{KindLabels, Stats};

/// Messages taken from Kafka between two steps of the dataflow.
const POLL_BUDGET: usize = 4096;

/// Everything a worker needs, shared by the workers of a process.
pub struct IngestContext {
    pub args: RunArgs,
    pub limits: Limits,
    pub partitions: i32,
    pub runtime: tokio::runtime::Handle,
    pub stats: Arc<Stats>,
    pub shutdown: Arc<AtomicBool>,
    /// Identifies this run in the audit table.
    pub run_id: String,
    /// Whether rows are deduplicated on (serverId, time) (see `--dedup`).
    pub natural_key: bool,
}

/// Runs the ingest dataflow on one worker until shutdown or, with `--exit-when-idle`, until
/// its partitions are drained and committed.
pub fn run_worker(worker: &mut Worker, ctx: &IngestContext) -> anyhow::Result<()> {
    let (index, peers) = (worker.index(), worker.peers());
    let args = &ctx.args;
    // First of all: make sure no other copy of the job writes this topic.
    let generation = agree_on_generation(worker, ctx)?;
    // Then: do the committed offsets still fit the topic? (a barrier: see topic_watch)
    let checked = check_topic(worker, ctx, generation)?;
    let partitions = owned_partitions(index, peers, ctx.partitions);
    let starts = resolve_starts(args, &partitions, &ctx.runtime, &checked)?;
    tracing::info!(worker = index, ?partitions, ?starts, "worker starting");
    let mut reader = PartitionReader::open(&args.kafka, &args.group, &starts)?;

    let mut input = InputHandle::new();
    let probe = ProbeHandle::new();
    let settings = WriterSettings {
        database_url: args.database.database_url.clone(),
        topic: args.kafka.topic.clone(),
        worker: index,
        workers: peers,
        connection: 0,
        // One worker leaves the database idle while it prepares each transaction; several
        // workers keep it busy already (measured: see the README's performance section).
        connections: args.sink_connections.unwrap_or(if peers == 1 { 2 } else { 1 }),
        audit_run: args.audit.then(|| ctx.run_id.clone()),
        natural_key: ctx.natural_key,
        rollups: args.rollups,
        generation,
        timeout: args.database_timeout,
    };
    worker.dataflow::<u64, _, _>(|scope| {
        scope
            .input_from(&mut input)
            .container::<Vec<Envelope>>()
            .write_durably(settings, args.batch_size, ctx.runtime.clone(), ctx.stats.clone())
            .probe_with(&probe);
    });

    let mut source = Source::new(&starts);
    let mut watch = PartitionWatch::new(ctx, index, peers, &partitions, &checked);
    let committer = Committer::spawn(
        &ctx.runtime,
        CommitterSettings {
            database_url: args.database.database_url.clone(),
            topic: args.kafka.topic.clone(),
            generation,
            timeout: args.database_timeout,
        },
        ctx.stats.clone(),
    );
    let mut commits = Commits::new(committer, ctx.stats.clone());
    let mut idle_since: Option<Instant> = None;
    // This worker's share of the process's byte bound.
    let bytes_in_flight = (args.max_bytes_in_flight / args.workers.max(1)).max(1);
    let mut backpressured_since: Option<Instant> = None;
    let mut held_back = false;

    while !ctx.shutdown.load(Ordering::Relaxed) {
        let durable = durable_frontier(&probe);
        commits.advance(durable, &mut source.closed, args.commit_interval, &reader, false);
        ctx.stats.durable_epoch.fetch_max(durable.saturating_sub(1), Ordering::Relaxed);
        ctx.stats.newest_epoch.fetch_max(*input.time(), Ordering::Relaxed);

        // Read, unless this source is as far ahead of the durable frontier as allowed, in
        // epochs or in bytes.
        let may_read =
            input.time() < &(durable + args.max_epochs_in_flight) && source.bytes_in_flight() < bytes_in_flight;
        ctx.stats.backpressured.set(&mut held_back, !may_read);
        // Held back for a while (the database is slow or away): stop fetching, so librdkafka's
        // prefetch queue does not grow either. Short waits are normal under load; ignore them.
        let held_since = *backpressured_since.get_or_insert_with(Instant::now);
        if may_read {
            backpressured_since = None;
        }
        reader.set_paused(!may_read && held_since.elapsed() > Duration::from_secs(1));
        if !may_read {
            watch.held_back(Instant::now());
        }
        let read = match may_read {
            true => source
                .read(&mut reader, &mut input, ctx, (args.epoch_records, args.epoch_bytes), &mut watch)
                .map_err(|reset| anyhow::anyhow!(watch.reset(&reset, ctx)))?,
            false => 0,
        };

        if source.in_epoch >= args.epoch_records
            || source.bytes_in_epoch >= args.epoch_bytes
            || (source.in_epoch > 0 && source.opened.elapsed() >= args.epoch_interval)
        {
            source.close_epoch(&mut input);
        } else if source.in_epoch == 0
            && read == 0
            && *input.time() <= durable
            && source.opened.elapsed() >= args.epoch_interval
        {
            // Idle and holding the frontier back: move out of the way, up to the in-flight
            // bound, at most once per epoch interval (an idle job must not spin).
            input.advance_to(durable + args.max_epochs_in_flight - 1);
            source.opened = Instant::now();
        }

        // Lag, stalls, retention gaps, resets, added partitions (topic_watch): an error is
        // the one line the job stops with.
        watch.tick(&mut reader, &mut source.offsets, ctx).map_err(|line| anyhow::anyhow!(line))?;
        if source.in_epoch == 0 && source.next_offsets() != source.last_closed {
            // The position moved past transaction markers: an empty epoch commits that.
            source.close_epoch(&mut input);
        }

        if let Some(wait) = args.exit_when_idle {
            let quiet = reader.all_at_end() && source.in_epoch == 0 && source.closed.is_empty() && commits.idle();
            match (quiet, idle_since) {
                (false, _) => idle_since = None,
                (true, None) => idle_since = Some(Instant::now()),
                (true, Some(since)) if since.elapsed() >= wait => break,
                (true, Some(_)) => {}
            }
        }
        worker.step_or_park(Some(if read > 0 { Duration::ZERO } else { Duration::from_millis(5) }));
    }

    ctx.stats.backpressured.set(&mut held_back, false);
    // Close the input: the open epoch's records are already in the dataflow and get written.
    if source.in_epoch > 0 {
        source.close_epoch(&mut input);
    }
    drop(input);
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(5)));
        commits.advance(durable_frontier(&probe), &mut source.closed, args.commit_interval, &reader, false);
    }
    commits.advance(u64::MAX, &mut source.closed, Duration::ZERO, &reader, true);
    while !commits.idle() {
        std::thread::sleep(Duration::from_millis(5));
        commits.mirror(&reader);
    }
    commits.mirror(&reader);
    watch.finish(ctx);
    if let Ok(mut total) = ctx.stats.latency.lock() {
        let _ = total.add(&commits.latency);
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
    let args = &ctx.args;
    // (generation, or -1 when another job holds the topic / -2 on any other error, with the
    // line saying why not)
    let outcome: Option<(i64, String)> = (worker.index() == 0).then(|| {
        let holder = crate::sink::fence::describe_holder(&args.group);
        let url = &args.database.database_url;
        let acquired =
            ctx.runtime.block_on(crate::sink::fence::acquire(url, &args.kafka.topic, &holder, args.take_over));
        match acquired {
            Ok(generation) => (generation, String::new()),
            Err(crate::sink::SinkError::Fenced(line)) => (-1, line),
            Err(e) => (-2, e.to_string()),
        }
    });
    match super::operators::from_first_worker::from_first_worker(worker, outcome) {
        Some((generation, _)) if generation >= 0 => Ok(generation),
        Some((-1, line)) => Err(TopicHeld(line).into()),
        Some((_, line)) => Err(anyhow::anyhow!(line)),
        None => Err(anyhow::anyhow!("worker 0 announced no fencing generation")),
    }
}

/// The least epoch not yet durable everywhere (u64::MAX once the dataflow is complete).
fn durable_frontier(probe: &ProbeHandle<u64>) -> u64 {
    probe.with_frontier(|f| f.first().copied().unwrap_or(u64::MAX))
}

/// Where each owned partition starts: the committed offset (past what retention deleted), or
/// `--start` on the job's very first run (any other partition without a committed offset
/// was added to the topic later: earliest). A `latest` start is pinned in the database
/// first, so a crash before the first commit cannot move it.
fn resolve_starts(
    args: &RunArgs,
    partitions: &[i32],
    runtime: &tokio::runtime::Handle,
    checked: &TopicCheck,
) -> anyhow::Result<Vec<(i32, StartOffset)>> {
    let (url, topic) = (&args.database.database_url, &args.kafka.topic);
    let committed = runtime.block_on(async { load_offsets(&crate::sink::connect(url).await?, topic).await })?;
    let mut starts = Vec::new();
    let mut to_pin = Vec::new();
    for &p in partitions {
        let start = match (committed.get(&p), checked.start_for_uncommitted(args.start)) {
            (Some(next), _) => StartOffset::At(checked.resume_at(p, *next)),
            (None, StartFrom::Earliest) => StartOffset::Earliest,
            (None, StartFrom::Latest) => {
                let end = crate::kafka::admin::end_offset(&args.kafka, p)?;
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
    Ok(starts)
}

/// The source side of the worker loop: reads, decodes, stamps with the current epoch.
struct Source {
    /// Next offset to read per owned partition (known once a message was read or the
    /// start was an explicit offset), checked against every message (kafka::watch).
    offsets: OffsetWatch,
    /// The offsets of the last epoch closed (or the start).
    last_closed: Vec<(i32, i64)>,
    /// Records in the open epoch, their bytes in memory, and when its first record arrived.
    in_epoch: usize,
    bytes_in_epoch: usize,
    opened: Instant,
    /// Kafka timestamps (ms) of the open epoch's records, for end-to-end latency.
    produced_ms: Vec<i64>,
    /// Closed epochs not yet durable.
    closed: VecDeque<ClosedEpoch>,
}

/// An epoch the source has closed: what to commit, and what to measure, once it is durable.
struct ClosedEpoch {
    epoch: u64,
    /// Next offset to read per partition when the epoch closed.
    offsets: Vec<(i32, i64)>,
    produced_ms: Vec<i64>,
    /// Bytes of its records in memory until it is durable.
    bytes: usize,
}

impl Source {
    fn new(starts: &[(i32, StartOffset)]) -> Self {
        let mut offsets = OffsetWatch::default();
        for (p, s) in starts {
            offsets.add(*p, if let StartOffset::At(o) = s { Some(*o) } else { None });
        }
        Source {
            last_closed: offsets.next_offsets(),
            offsets,
            in_epoch: 0,
            bytes_in_epoch: 0,
            opened: Instant::now(),
            produced_ms: Vec::new(),
            closed: VecDeque::new(),
        }
    }

    fn next_offsets(&self) -> Vec<(i32, i64)> {
        self.offsets.next_offsets()
    }

    /// Bytes of records read and not yet durable (the open epoch and the closed ones).
    fn bytes_in_flight(&self) -> usize {
        self.bytes_in_epoch + self.closed.iter().map(|c| c.bytes).sum::<usize>()
    }

    /// Reads up to the poll budget or the epoch's room; returns how many messages were read.
    /// A message below its partition's expected offset is not sent: the topic went back
    /// under the job, and the caller stops.
    fn read(
        &mut self,
        reader: &mut PartitionReader,
        input: &mut InputHandle<u64, timely::container::CapacityContainerBuilder<Vec<Envelope>>>,
        ctx: &IngestContext,
        (epoch_records, epoch_bytes): (usize, usize),
        watch: &mut PartitionWatch,
    ) -> Result<usize, TopicReset> {
        let now = now_ms();
        let arrived = Instant::now();
        let (mut read, mut dead) = (0, 0);
        let mut error = None;
        while read < POLL_BUDGET && self.in_epoch < epoch_records && self.bytes_in_epoch < epoch_bytes {
            let message = match reader.poll() {
                Polled::Message(m) => m,
                Polled::Nothing => break,
                Polled::Error(e) => {
                    error = Some(e);
                    break;
                }
            };
            self.offsets.message(message.partition(), message.offset())?;
            watch.message(message.partition(), arrived);
            let raw = message.payload().unwrap_or_default();
            let time_ms = message.timestamp().to_millis();
            if let Some(t) = time_ms {
                self.produced_ms.push(t);
            }
            let decoded = decode(raw, message.key(), time_ms, now, &ctx.limits);
            if let Err(e) = &decoded {
                dead += 1;
                ctx.stats.dead_letters_by_reason.get_or_create(&KindLabels { reason: e.kind().to_owned() }).inc();
            }
            let envelope = Envelope::new(message.partition(), message.offset(), message.key(), raw, time_ms, decoded);
            self.bytes_in_epoch += envelope.approx_bytes();
            input.send(envelope);
            if self.in_epoch == 0 {
                self.opened = Instant::now();
            }
            self.in_epoch += 1;
            read += 1;
        }
        Stats::add(&ctx.stats.records_read, read as u64);
        Stats::add(&ctx.stats.dead_letters, dead);
        if let Some(e) = error {
            reader.note_error(&e);
        }
        Ok(read)
    }

    fn close_epoch(
        &mut self,
        input: &mut InputHandle<u64, timely::container::CapacityContainerBuilder<Vec<Envelope>>>,
    ) {
        let epoch = *input.time();
        let produced_ms = std::mem::take(&mut self.produced_ms);
        self.last_closed = self.next_offsets();
        let bytes = std::mem::take(&mut self.bytes_in_epoch);
        self.closed.push_back(ClosedEpoch { epoch, offsets: self.last_closed.clone(), produced_ms, bytes });
        input.advance_to(epoch + 1);
        self.in_epoch = 0;
    }
}

/// The commit side of the worker loop: offsets of epochs behind the durable frontier go to
/// the database (at most once per commit interval) and then to the consumer group.
struct Commits {
    committer: Committer,
    stats: Arc<Stats>,
    /// Produce-to-durable latency of every record, in milliseconds.
    latency: hdrhistogram::Histogram<u64>,
    ready: Option<Vec<(i32, i64)>>,
    last: Instant,
    /// A commit sent to the database whose offsets go to the consumer group once it lands.
    mirror_after: Option<(u64, Vec<(i32, i64)>)>,
    committed: Vec<(i32, i64)>,
}

impl Commits {
    fn new(committer: Committer, stats: Arc<Stats>) -> Self {
        Commits {
            committer,
            stats,
            latency: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 2).expect("valid histogram bounds"),
            ready: None,
            last: Instant::now(),
            mirror_after: None,
            committed: Vec::new(),
        }
    }

    fn advance(
        &mut self,
        durable: u64,
        closed: &mut VecDeque<ClosedEpoch>,
        interval: Duration,
        reader: &PartitionReader,
        force: bool,
    ) {
        let now = now_ms();
        while let Some(done) = closed.pop_front_if(|c| c.epoch < durable) {
            for produced in &done.produced_ms {
                self.latency.saturating_record((now - produced).max(1) as u64);
            }
            Stats::add(&self.stats.epochs_durable, 1);
            self.ready = Some(done.offsets);
        }
        if self.ready.as_ref() == Some(&self.committed) {
            self.ready = None;
        }
        if self.ready.is_some() && (force || self.last.elapsed() >= interval) {
            let offsets = self.ready.take().unwrap_or_default();
            let seq = self.committer.commit(offsets.clone());
            self.mirror_after = Some((seq, offsets.clone()));
            self.committed = offsets;
            self.last = Instant::now();
        }
        self.mirror(reader);
    }

    fn mirror(&mut self, reader: &PartitionReader) {
        if let Some((_, offsets)) = self.mirror_after.take_if(|(seq, _)| self.committer.done() >= *seq) {
            reader.commit_to_group(&offsets);
        }
    }

    fn idle(&self) -> bool {
        self.ready.is_none() && self.committer.idle()
    }
}
