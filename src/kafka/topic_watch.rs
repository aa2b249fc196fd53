//! The topic under the job: what the operator or the cluster may have done to it.
//!
//! ```text
//! start    worker 0: committed offsets vs each partition's low/high watermarks
//!            beyond the end      -> refuse (or --on-topic-reset start-over: forget offsets
//!                                   and watermarks, read from the earliest offset)
//!            below the log start -> retention deleted unread messages: go on, count the gap
//!          -> broadcast to every worker (a barrier: no writer loads watermarks before a
//!             start-over is done)
//! running  every source worker, for the partitions it owns:
//!            a message below the expected offset, an end below it -> stop (reset)
//!            a jump the low watermark proves deleted               -> count the gap
//!            messages to read, none delivered                      -> stalled; stop after
//!                                                                     --stall-timeout
//!            partitions added to the topic                         -> read them
//! ```
//!
//! The bookkeeping itself is pure and lives in `kafka::watch`; this module feeds it from the
//! reader (through `kafka::source`), and reports what it finds in the log, the metrics, `/healthz` and the partition
//! events `fleetflow status` shows. Offsets alone cannot tell a recreated topic that has
//! already grown past the old offsets; a reset found while running is therefore recorded,
//! and a restart refuses until the operator starts the topic over.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fleetflow_dataflows::from_first_worker::from_first_worker;
use fleetflow_dataflows::routing::owned_partitions;
use timely::worker::Worker;

use crate::config::{OnTopicReset, StartFrom};
use crate::context::IngestContext;
use crate::kafka::consumer::{PartitionReader, StartOffset};
use crate::kafka::landmarks::{self, Found};
use crate::kafka::watch::{check_start, Backlog, Gap, OffsetWatch, StallChange, StallDetector, StartCheck, TopicReset};
use crate::sink::events::{self, Event, EventKind, EventLog};
use crate::sink::offsets::Landmark;
use crate::stats::PartitionLabels;

/// How long the start-up check waits for the messages the last commits stood on.
const LANDMARK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the last event before a stop may take to reach the database.
const LAST_EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the start-up check decided, the same in every worker.
#[derive(Clone, Debug, Default)]
pub struct TopicCheck {
    /// No offsets were ever committed for the topic: `--start` applies.
    pub first_run: bool,
    /// Offsets retention deleted before the job read them, per partition.
    pub gaps: Vec<Gap>,
}

impl TopicCheck {
    /// Where a partition without a committed offset starts: `--start` on the job's very first
    /// run only; a partition that appears later is read from its earliest offset.
    pub fn start_for_uncommitted(&self, start: StartFrom) -> StartFrom {
        if self.first_run {
            start
        } else {
            StartFrom::Earliest
        }
    }

    /// Where a partition with committed offset `next` resumes: after what retention deleted.
    pub fn resume_at(&self, partition: i32, next: i64) -> i64 {
        self.gaps.iter().filter(|g| g.partition == partition).map(|g| g.to).fold(next, i64::max)
    }
}

/// Checks the committed offsets against the topic (worker 0, after the job took the topic)
/// and tells every worker the outcome; a refusal is the same one line in every process.
pub fn check_topic(worker: &mut Worker, ctx: &IngestContext, generation: i64) -> anyhow::Result<TopicCheck> {
    // (the line that refuses, or empty; first run; gaps as (partition, from, to))
    let outcome: Option<Outcome> = (worker.index() == 0).then(|| match inspect_topic(ctx, generation) {
        Ok(c) => (String::new(), c.first_run, c.gaps.iter().map(|g| (g.partition, g.from, g.to)).collect()),
        Err(e) => (crate::one_line(&e), false, Vec::new()),
    });
    match from_first_worker(worker, outcome) {
        Some((line, _, _)) if !line.is_empty() => Err(anyhow::anyhow!(line)),
        Some((_, first_run, gaps)) => Ok(TopicCheck {
            first_run,
            gaps: gaps.into_iter().map(|(partition, from, to)| Gap { partition, from, to }).collect(),
        }),
        None => Err(anyhow::anyhow!("worker 0 announced no outcome of the topic check")),
    }
}

type Outcome = (String, bool, Vec<(i32, i64, i64)>);

/// The start-up check itself (worker 0).
fn inspect_topic(ctx: &IngestContext, generation: i64) -> anyhow::Result<TopicCheck> {
    let (config, topic) = (&ctx.config, &ctx.config.kafka.topic);
    let url = &config.database.url;
    let (committed, pending, landmarks) = ctx.runtime.block_on(async {
        let client = crate::sink::connect(url).await?;
        let committed = crate::sink::offsets::load_offsets(&client, topic).await?;
        let pending = events::pending_reset(&client, topic).await?;
        let landmarks = crate::sink::offsets::load_landmarks(&client, topic).await?;
        Ok::<_, crate::sink::SinkError>((committed, pending, landmarks))
    })?;
    let mut committed: Vec<(i32, i64)> = committed.into_iter().collect();
    committed.sort_unstable();
    let all: Vec<i32> = (0..ctx.partitions).collect();
    let mut marks = std::collections::BTreeMap::new();
    for (partition, answer) in crate::kafka::admin::watermarks_each(&config.kafka, &all)? {
        match answer {
            Ok(m) => {
                marks.insert(partition, m);
            }
            // Checked while the job runs (kafka::watch), like every partition.
            Err(e) => tracing::warn!(topic = %topic, partition, error = %e, "cannot check the partition at start"),
        }
    }

    let mut problems = Vec::new();
    let mut gaps = Vec::new();
    for &(partition, next) in &committed {
        if partition >= ctx.partitions {
            problems
                .push(format!("partition {partition} no longer exists (the topic has {} partitions)", ctx.partitions));
            continue;
        }
        let Some(&(low, high)) = marks.get(&partition) else { continue };
        match check_start(next, low, high) {
            StartCheck::Fine => {}
            StartCheck::BeyondEnd { committed, end } => {
                problems.push(format!("partition {partition} ends at offset {end}, the job had read up to {committed}"))
            }
            StartCheck::Gap { from, to } => gaps.push(Gap { partition, from, to }),
        }
    }
    if problems.is_empty() {
        problems.extend(recreated_under_landmarks(ctx, &landmarks, &marks));
    }
    if let Some(found) = pending.as_ref().filter(|_| problems.is_empty()) {
        problems.push(format!("found earlier: {found}"));
    }
    if problems.is_empty() {
        ctx.runtime.block_on(async {
            let client = crate::sink::connect(url).await?;
            for gap in &gaps {
                events::record(&client, topic, &gap_event(gap)).await?;
            }
            Ok::<_, crate::sink::SinkError>(())
        })?;
        return Ok(TopicCheck { first_run: committed.is_empty(), gaps });
    }

    let what = format!(
        "the offsets this database holds for topic {topic:?} do not fit it (deleted and recreated, or truncated?): {}",
        problems.join("; ")
    );
    match config.topic.on_reset {
        // Not recorded as a reset: the operator may only have pointed the job at the wrong
        // cluster, and must be able to fix that without starting over (a reset found while
        // the job ran is recorded: the topic went back under it).
        OnTopicReset::Refuse => {
            anyhow::bail!(
                "{what}. Refusing to start: its new messages would be dropped as replays. To read the topic again from \
                 its earliest offsets, forgetting the old offsets and exactly-once watermarks (rows already written \
                 stay), restart with --on-topic-reset start-over"
            )
        }
        OnTopicReset::StartOver => {
            // A partition whose start is unknown gets no offset: it is read from the earliest.
            let starts: Vec<(i32, i64)> = marks.iter().map(|(p, (low, _))| (*p, *low)).collect();
            ctx.runtime.block_on(async {
                let mut client = crate::sink::connect(url).await?;
                events::start_over(&mut client, topic, generation, &starts).await
            })?;
            tracing::warn!(
                topic = %topic, ?starts,
                "--on-topic-reset start-over: {what}; forgot the topic's committed offsets and exactly-once watermarks, \
                 reading every partition again from its earliest offset"
            );
            Ok(TopicCheck { first_run: false, gaps: Vec::new() })
        }
    }
}

/// Offsets that fit the topic may still belong to an older one (deleted, recreated and grown
/// past them while the job was stopped): the message each commit stood on must still be
/// there (`kafka::landmarks`). One problem line per partition where another message is.
fn recreated_under_landmarks(
    ctx: &IngestContext,
    landmarks: &[(i32, Landmark)],
    marks: &std::collections::BTreeMap<i32, (i64, i64)>,
) -> Vec<String> {
    // Only landmarks the topic still holds: retention may have deleted older ones (a gap).
    let to_check: Vec<(i32, Landmark)> = landmarks
        .iter()
        .filter(|(p, m)| marks.get(p).is_some_and(|(low, high)| (*low..*high).contains(&m.offset)))
        .copied()
        .collect();
    let found = landmarks::check(&ctx.config.kafka, &to_check, LANDMARK_TIMEOUT).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot fetch the messages the last commits stood on; not checked");
        vec![Found::Unknown; to_check.len()]
    });
    let mut problems = Vec::new();
    for ((partition, mark), found) in to_check.iter().zip(found) {
        match found {
            Found::Same => {}
            Found::Other { offset, time_ms } if offset == mark.offset => problems.push(format!(
                "partition {partition}: the message at offset {} was produced at {} when the job read it, another \
                 one is there now (produced at {})",
                mark.offset,
                format_ms(Some(mark.time_ms)),
                format_ms(time_ms)
            )),
            Found::Other { offset, .. } => problems.push(format!(
                "partition {partition}: offset {} held the message the job read last (produced at {}), now it holds \
                 none (the next is at offset {offset})",
                mark.offset,
                format_ms(Some(mark.time_ms))
            )),
            Found::Unknown => tracing::warn!(
                topic = %ctx.config.kafka.topic, partition, offset = mark.offset,
                "cannot fetch the message the last commit stood on; the topic is not checked for a re-creation there"
            ),
        }
    }
    problems
}

fn format_ms(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or("an unknown time".to_owned(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn gap_event(gap: &Gap) -> Event {
    Event {
        partition: gap.partition,
        kind: EventKind::Skipped,
        range: Some((gap.from, gap.to)),
        detail: format!("{} messages deleted by retention before the job read them", gap.count()),
    }
}

/// Watches the partitions one source worker reads, fed by the worker loop.
pub struct PartitionWatch {
    topic: String,
    worker: usize,
    workers: usize,
    stalls: StallDetector,
    /// After this long stalled, the job stops (zero: never).
    stall_timeout: Duration,
    events: EventLog,
    /// When the watermarks, the partition count and the stalls were last checked.
    checked: (Instant, Instant, Instant),
    /// Last known lag per partition, and its sum as added to the process's total.
    lag: std::collections::BTreeMap<i32, i64>,
    lag_reported: i64,
}

impl PartitionWatch {
    /// Starts watching `partitions`; reports the gaps the start-up check found in them.
    pub fn new(ctx: &IngestContext, worker: usize, workers: usize, partitions: &[i32], check: &TopicCheck) -> Self {
        let config = &ctx.config;
        let stall_after = if config.topic.stall_timeout.is_zero() {
            Duration::from_secs(30)
        } else {
            (config.topic.stall_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
        };
        let now = Instant::now();
        let mut stalls = StallDetector::new(stall_after);
        for p in partitions {
            stalls.add(*p, now);
        }
        let watch = PartitionWatch {
            topic: config.kafka.topic.clone(),
            worker,
            workers,
            stalls,
            stall_timeout: config.topic.stall_timeout,
            events: EventLog::spawn(&ctx.runtime, config.database.url.clone(), config.kafka.topic.clone()),
            checked: (now, now, now),
            lag: Default::default(),
            lag_reported: 0,
        };
        for gap in check.gaps.iter().filter(|g| partitions.contains(&g.partition)) {
            watch.count_gap(gap, ctx);
        }
        watch
    }

    /// A message of `partition` arrived.
    pub fn message(&mut self, partition: i32, now: Instant) {
        self.stalls.message(partition, now);
    }

    /// The worker does not read (backpressure): quiet partitions are not to blame.
    pub fn held_back(&mut self, now: Instant) {
        self.stalls.held_back(now);
    }

    /// The periodic checks: watermarks and lag every `--report-interval`, the partition count
    /// every `--metadata-interval`, stalls twice a second. `Err` is the line the job stops
    /// with.
    pub fn tick(
        &mut self,
        reader: &mut PartitionReader,
        offsets: &mut OffsetWatch,
        ctx: &IngestContext,
    ) -> Result<(), String> {
        let now = Instant::now();
        if now.duration_since(self.checked.1) >= ctx.config.topic.metadata_interval {
            self.checked.1 = now;
            self.add_new_partitions(reader, offsets, ctx)?;
        }
        if now.duration_since(self.checked.0) >= ctx.config.report_interval {
            self.checked.0 = now;
            self.check_watermarks(reader, offsets, ctx)?;
        }
        if now.duration_since(self.checked.2) >= Duration::from_millis(500) {
            self.checked.2 = now;
            self.check_stalls(reader, ctx, now)?;
        }
        Ok(())
    }

    /// The line to stop with when a message showed the topic went back under the job.
    pub fn reset(&self, reset: &TopicReset, ctx: &IngestContext) -> String {
        let line = format!(
            "topic {:?} was deleted and recreated, or truncated, while the job ran: {reset}. Nothing of it was written; \
             to read the topic again from its earliest offsets, forgetting the old offsets and exactly-once watermarks \
             (rows already written stay), restart with --on-topic-reset start-over",
            self.topic
        );
        let partition = match reset {
            TopicReset::Backwards { partition, .. }
            | TopicReset::BeyondEnd { partition, .. }
            | TopicReset::PartitionGone { partition, .. } => *partition,
        };
        let event = Event { partition, kind: EventKind::Reset, range: None, detail: line.clone() };
        events::record_now(&ctx.runtime, &ctx.config.database.url, &self.topic, &event, LAST_EVENT_TIMEOUT);
        line
    }

    /// Takes this worker's lag out of the process's total (the worker is done).
    pub fn finish(&mut self, ctx: &IngestContext) {
        ctx.stats.lag.fetch_sub(self.lag_reported, Ordering::Relaxed);
        self.lag_reported = 0;
    }

    fn check_watermarks(
        &mut self,
        reader: &mut PartitionReader,
        offsets: &mut OffsetWatch,
        ctx: &IngestContext,
    ) -> Result<(), String> {
        // The position moves past transaction markers and aborted records: lag reaches 0.
        for (partition, position) in reader.positions() {
            offsets.position(partition, position);
        }
        let now = Instant::now();
        for partition in reader.partitions().to_vec() {
            match reader.watermarks(partition) {
                Ok((low, high)) => {
                    let gaps = offsets.watermarks(partition, low, high).map_err(|r| self.reset(&r, ctx))?;
                    for gap in &gaps {
                        self.count_gap(gap, ctx);
                        self.events.send(gap_event(gap));
                    }
                    let behind = offsets.backlog(partition, low, high);
                    self.lag.insert(partition, behind);
                    ctx.stats.partition_lag.get_or_create(&PartitionLabels { partition }).set(behind);
                    let backlog = if behind > 0 { Backlog::Messages(behind) } else { Backlog::Empty };
                    self.stalls.backlog(partition, backlog, now);
                }
                Err(e) => {
                    reader.note_error(&e);
                    self.stalls.backlog(partition, Backlog::Unknown, now);
                }
            }
        }
        let lag: i64 = self.lag.values().sum();
        ctx.stats.lag.fetch_add(lag - self.lag_reported, Ordering::Relaxed);
        self.lag_reported = lag;
        Ok(())
    }

    fn check_stalls(&mut self, reader: &PartitionReader, ctx: &IngestContext, now: Instant) -> Result<(), String> {
        let last_error = || {
            reader.last_error().map_or("none".to_owned(), |(text, ago)| {
                format!("{text} ({} ago)", humantime::format_duration(Duration::from_secs(ago.as_secs())))
            })
        };
        for change in self.stalls.check(now) {
            match change {
                StallChange::Stalled { partition, quiet, backlog } => {
                    let reason = format!(
                        "no message for {} although {backlog}; last Kafka error: {}",
                        humantime::format_duration(Duration::from_secs(quiet.as_secs())),
                        last_error()
                    );
                    tracing::warn!(topic = %self.topic, partition, "partition stalled: {reason}");
                    let labels = PartitionLabels { partition };
                    ctx.stats.partition_stalls.get_or_create(&labels).inc();
                    ctx.stats.partition_stalled.get_or_create(&labels).set(1);
                    if let Ok(mut stalled) = ctx.stats.stalled.lock() {
                        stalled.insert(partition, reason.clone());
                    }
                    self.events.send(Event { partition, kind: EventKind::Stalled, range: None, detail: reason });
                }
                StallChange::Recovered { partition } => {
                    tracing::info!(topic = %self.topic, partition, "partition delivers again");
                    ctx.stats.partition_stalled.get_or_create(&PartitionLabels { partition }).set(0);
                    if let Ok(mut stalled) = ctx.stats.stalled.lock() {
                        stalled.remove(&partition);
                    }
                    self.events.send(Event {
                        partition,
                        kind: EventKind::Recovered,
                        range: None,
                        detail: "delivers messages again".into(),
                    });
                }
            }
        }
        match self.stalls.longest(now) {
            Some((partition, quiet, backlog)) if !self.stall_timeout.is_zero() && quiet >= self.stall_timeout => {
                let line = format!(
                    "partition {partition} of topic {:?} cannot be read: no message for {} although {backlog}; \
                     last Kafka error: {}. Stopping (--stall-timeout {})",
                    self.topic,
                    humantime::format_duration(Duration::from_secs(quiet.as_secs())),
                    last_error(),
                    humantime::format_duration(self.stall_timeout)
                );
                let event = Event { partition, kind: EventKind::Stopped, range: None, detail: line.clone() };
                events::record_now(&ctx.runtime, &ctx.config.database.url, &self.topic, &event, LAST_EVENT_TIMEOUT);
                Err(line)
            }
            _ => Ok(()),
        }
    }

    /// Reads the partitions of this worker that were added to the topic since the last look:
    /// from the committed offset if the database has one, else from the earliest offset.
    fn add_new_partitions(
        &mut self,
        reader: &mut PartitionReader,
        offsets: &mut OffsetWatch,
        ctx: &IngestContext,
    ) -> Result<(), String> {
        let count = match reader.partition_count() {
            Ok(count) => count,
            Err(e) => {
                reader.note_error(&e);
                return Ok(());
            }
        };
        if let Some(&partition) = reader.partitions().iter().find(|p| **p >= count) {
            return Err(self.reset(&TopicReset::PartitionGone { partition, partitions: count }, ctx));
        }
        let new: Vec<i32> = owned_partitions(self.worker, self.workers, count)
            .into_iter()
            .filter(|p| !reader.partitions().contains(p))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let (url, topic) = (&ctx.config.database.url, &self.topic);
        let committed = match ctx
            .runtime
            .block_on(async { crate::sink::offsets::load_offsets(&crate::sink::connect(url).await?, topic).await })
        {
            Ok(committed) => committed,
            Err(e) => {
                tracing::warn!(error = %e, ?new, "partitions were added to the topic; cannot load their offsets yet");
                return Ok(());
            }
        };
        let starts: Vec<(i32, StartOffset)> =
            new.iter().map(|p| (*p, committed.get(p).map_or(StartOffset::Earliest, |o| StartOffset::At(*o)))).collect();
        if let Err(e) = reader.add_partitions(&starts) {
            tracing::warn!(error = %e, ?new, "partitions were added to the topic; cannot read them yet");
            return Ok(());
        }
        let now = Instant::now();
        for (partition, start) in starts {
            let (from, range) = match start {
                StartOffset::At(o) => (format!("its committed offset {o}"), Some((o, o))),
                _ => ("its earliest offset".to_owned(), None),
            };
            tracing::info!(topic = %topic, partition, partitions = count, "partition added to the topic; reading it from {from}");
            offsets.add(partition, range.map(|r| r.0));
            self.stalls.add(partition, now);
            self.events.send(Event {
                partition,
                kind: EventKind::Added,
                range,
                detail: format!("added to the topic ({count} partitions); read from {from}"),
            });
        }
        Ok(())
    }

    /// Counts and logs a gap retention left in one of this worker's partitions.
    fn count_gap(&self, gap: &Gap, ctx: &IngestContext) {
        tracing::warn!(
            topic = %self.topic, partition = gap.partition, from = gap.from, to = gap.to - 1, count = gap.count(),
            "retention deleted {} messages of partition {} before the job read them (offsets {} to {}); going on",
            gap.count(), gap.partition, gap.from, gap.to - 1
        );
        ctx.stats
            .skipped_offsets
            .get_or_create(&PartitionLabels { partition: gap.partition })
            .inc_by(gap.count() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_latest_applies_to_the_first_run_only() {
        let first = TopicCheck { first_run: true, gaps: vec![] };
        assert_eq!(first.start_for_uncommitted(StartFrom::Latest), StartFrom::Latest);
        let later = TopicCheck { first_run: false, gaps: vec![] };
        assert_eq!(later.start_for_uncommitted(StartFrom::Latest), StartFrom::Earliest);
    }

    #[test]
    fn a_partition_resumes_after_what_retention_deleted() {
        let check = TopicCheck { first_run: false, gaps: vec![Gap { partition: 1, from: 10, to: 500 }] };
        assert_eq!(check.resume_at(1, 10), 500);
        assert_eq!(check.resume_at(0, 10), 10);
    }
}
