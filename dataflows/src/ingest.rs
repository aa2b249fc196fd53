//! The ingest dataflow and the worker loop around it.
//!
//! ```text
//! reader (this worker's partitions) -> source: stamp with the open epoch
//!   -> exchange by key group -> durable sink (batches to the epoch writers)
//!   -> probe: the durable frontier -> commit stage: offsets of epochs behind it
//! ```
//!
//! The source and the commit stage run in the worker's own loop around the dataflow: each
//! turn ([`Ingest::turn`]) commits what became durable, reads unless backpressured, closes or
//! advances the epoch, runs the reader's periodic checks, and steps the dataflow.
//!
//! Epochs are stamped with the wall clock: an epoch closes into the next one at
//! `max(epoch + 1, now)`, in microseconds since the Unix epoch, and a source with nothing to
//! read moves its epoch up to now once per epoch interval. The durable frontier is the least
//! epoch of every worker, so epochs numbered by each worker's own count would let a worker
//! that closed more of them (a burst, a busier partition) wait on the others' counts: up to
//! the in-flight bound, seconds of latency on a machine with cores to spare. On the clock,
//! every worker's epochs stand for the same moments, in every process. Clocks must be kept in
//! step (NTP): a skewed clock costs latency, never correctness (epochs only order records),
//! but a host whose clock is behind by X holds every worker's epochs back by X.
//!
//! Backpressure: a source holds at most `max_epochs_in_flight` closed epochs and
//! `max_bytes_in_flight` bytes of records not yet durable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};
use timely::worker::Worker;

use crate::commit::{Commits, OffsetCommitter};
use crate::durable_sink::{Durable, EpochWriter, SinkShape, WriteDurably};
use crate::source::{PartitionReader, Source, Stop};

/// How a worker cuts epochs, bounds what is in flight, and commits.
#[derive(Clone, Debug)]
pub struct IngestSettings {
    /// An epoch closes after this many records...
    pub epoch_records: usize,
    /// ... or this many bytes of records in memory ...
    pub epoch_bytes: usize,
    /// ... or this long after its first record. Also how often an idle source moves its
    /// epoch out of the frontier's way.
    pub epoch_interval: Duration,
    /// Closed epochs a source may hold that are not yet durable.
    pub max_epochs_in_flight: u64,
    /// Bytes of records this worker may hold until they are durable.
    pub max_bytes_in_flight: usize,
    /// Records per batch handed to a writer, and writers per worker.
    pub sink: SinkShape,
    /// At most one offset commit per interval (the last one is forced at the end).
    pub commit_interval: Duration,
    /// Finish once every partition is read to its end, written and committed, and has
    /// stayed so this long.
    pub exit_when_idle: Option<Duration>,
}

/// What a worker reports as it goes; every method has a default that ignores it. The job
/// feeds its metrics from here.
pub trait Observer {
    /// `n` records were read.
    fn records_read(&mut self, _n: usize) {}
    /// Each turn: the newest durable epoch (the frontier minus one) and the open epoch.
    fn epochs(&mut self, _durable: u64, _open: u64) {}
    /// The source became held back by the in-flight bound (`true`), or free again.
    fn backpressured(&mut self, _held: bool) {}
    /// An epoch of this source became durable; its records were produced at these times
    /// (ms since the Unix epoch).
    fn epoch_durable(&mut self, _produced_ms: &[i64]) {}
}

impl Observer for () {}

/// What a turn of the worker loop found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Keep going.
    Running,
    /// `exit_when_idle`: everything is read, durable and committed; call [`Ingest::finish`].
    Idle,
}

/// One worker of the ingest dataflow: the dataflow itself, the source that feeds it and the
/// commit stage that follows its durable frontier.
pub struct Ingest<R: PartitionReader, C: OffsetCommitter, O: Observer> {
    settings: IngestSettings,
    reader: R,
    observer: O,
    input: InputHandle<u64, CapacityContainerBuilder<Vec<R::Record>>>,
    probe: ProbeHandle<u64>,
    source: Source,
    commits: Commits<C>,
    idle_since: Option<Instant>,
    backpressured_since: Option<Instant>,
    held_back: bool,
    /// Moments (caller's ms) this worker had read its partitions to the end, with the newest
    /// epoch then holding records it had read; oldest first, one per epoch.
    readings: std::collections::VecDeque<(u64, u64)>,
    /// The newest such moment whose records are all durable.
    durable_reading: Option<u64>,
}

impl<R: PartitionReader, C: OffsetCommitter, O: Observer> Ingest<R, C, O> {
    /// Builds the dataflow on `worker`, with the writers `make_writer(connection, durable)`
    /// creates. Every worker of the job must build it (timely matches dataflows by order).
    pub fn new<W, F>(
        worker: &mut Worker,
        settings: IngestSettings,
        reader: R,
        committer: C,
        make_writer: F,
        observer: O,
    ) -> Self
    where
        W: EpochWriter<R::Record>,
        F: FnMut(usize, Durable) -> W,
    {
        // Zero sizes would close an empty epoch every turn or never let a source read.
        let settings = IngestSettings {
            epoch_records: settings.epoch_records.max(1),
            epoch_bytes: settings.epoch_bytes.max(1),
            max_epochs_in_flight: settings.max_epochs_in_flight.max(1),
            max_bytes_in_flight: settings.max_bytes_in_flight.max(1),
            ..settings
        };
        let mut input = InputHandle::new();
        let probe = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            scope
                .input_from(&mut input)
                .container::<Vec<R::Record>>()
                .write_durably(settings.sink, make_writer)
                .probe_with(&probe);
        });
        let source = Source::new(reader.next_offsets());
        Ingest {
            settings,
            reader,
            observer,
            input,
            probe,
            source,
            commits: Commits::new(committer),
            idle_since: None,
            backpressured_since: None,
            held_back: false,
            readings: std::collections::VecDeque::new(),
            durable_reading: None,
        }
    }

    /// The least epoch not yet durable everywhere (`u64::MAX` once the dataflow is complete).
    pub fn durable_frontier(&self) -> u64 {
        self.probe.with_frontier(|f| f.first().copied().unwrap_or(u64::MAX))
    }

    /// The latest moment at which this worker had read its partitions to the end and
    /// everything it had read by then is durable now (every worker's writer committed its
    /// part): what the alert clock may move to (`AlertFeeder::tick`). Call once per turn of
    /// the worker loop with the wall clock; `None` until such a moment exists.
    ///
    /// Having read to the end is not enough: a backlog is read up to the in-flight bound
    /// ahead of the database. Nothing in flight right now is too much: under steady traffic
    /// an epoch is almost always open, so each moment waits for its own epochs instead.
    pub fn durable_reading(&mut self, now_ms: u64) -> Option<u64> {
        if self.reader.at_end() {
            // The newest epoch holding something read by now (the open one, else the newest
            // closed one not yet durable), if any.
            let newest = if self.source.in_epoch > 0 {
                Some(*self.input.time())
            } else {
                self.source.closed.back().map(|c| c.epoch)
            };
            match (newest, self.readings.back_mut()) {
                (None, _) => {
                    self.readings.clear();
                    self.durable_reading = Some(now_ms);
                }
                (Some(epoch), Some(back)) if back.0 == epoch => back.1 = now_ms,
                (Some(epoch), _) => self.readings.push_back((epoch, now_ms)),
            }
        }
        let durable = self.durable_frontier();
        while let Some((_, at)) = self.readings.pop_front_if(|(epoch, _)| *epoch < durable) {
            self.durable_reading = Some(at);
        }
        self.durable_reading
    }

    /// The reader, for the caller's own checks.
    pub fn reader(&self) -> &R {
        &self.reader
    }

    /// One turn of the worker loop, ending with a step of the dataflow (which parks for up
    /// to 5 ms when nothing was read). `Err` is the line the worker stops with.
    pub fn turn(&mut self, worker: &mut Worker) -> Result<Turn, Stop> {
        let durable = self.durable_frontier();
        self.advance_commits(durable, self.settings.commit_interval, false);
        let s = &self.settings;
        self.observer.epochs(durable.saturating_sub(1), *self.input.time());

        // Read, unless this source holds as much not yet durable as allowed, in epochs or
        // in bytes.
        let may_read = (self.source.closed.len() as u64) < s.max_epochs_in_flight
            && self.source.bytes_in_flight() < s.max_bytes_in_flight;
        if self.held_back == may_read {
            self.held_back = !may_read;
            self.observer.backpressured(self.held_back);
        }
        // Held back for a while (the writers are slow or away): stop fetching, so nothing
        // piles up below the reader either. Short waits are normal under load; ignore them.
        let held_since = *self.backpressured_since.get_or_insert_with(Instant::now);
        if may_read {
            self.backpressured_since = None;
        }
        self.reader.set_paused(!may_read && held_since.elapsed() > Duration::from_secs(1));
        let read = if may_read {
            let input = &mut self.input;
            self.source.read(&mut self.reader, (s.epoch_records, s.epoch_bytes), |r| input.send(r))?
        } else {
            self.reader.held_back();
            0
        };
        self.observer.records_read(read);

        let source = &mut self.source;
        if source.in_epoch >= s.epoch_records
            || source.bytes_in_epoch >= s.epoch_bytes
            || (source.in_epoch > 0 && source.opened.elapsed() >= s.epoch_interval)
        {
            self.close_epoch();
        } else if source.in_epoch == 0 && read == 0 && source.opened.elapsed() >= s.epoch_interval {
            // Idle: keep up with the clock, so the other workers' epochs are not held back,
            // at most once per epoch interval (each move is news to every worker).
            let now = clock_epoch();
            if now > *self.input.time() {
                self.input.advance_to(now);
            }
            source.opened = Instant::now();
        }

        self.reader.tick()?;
        if self.source.in_epoch == 0 && self.reader.next_offsets() != self.source.last_closed {
            // The position moved without records (past transaction markers, over a gap):
            // an empty epoch commits that.
            self.close_epoch();
        }

        let mut turn = Turn::Running;
        if let Some(wait) = self.settings.exit_when_idle {
            let quiet = self.reader.at_end()
                && self.source.in_epoch == 0
                && self.source.closed.is_empty()
                && self.commits.idle();
            match (quiet, self.idle_since) {
                (false, _) => self.idle_since = None,
                (true, None) => self.idle_since = Some(Instant::now()),
                (true, Some(since)) if since.elapsed() >= wait => turn = Turn::Idle,
                (true, Some(_)) => {}
            }
        }
        worker.step_or_park(Some(if read > 0 { Duration::ZERO } else { Duration::from_millis(5) }));
        Ok(turn)
    }

    /// Closes the input and waits until everything read is durable and committed (the
    /// open epoch's records are already in the dataflow and get written). Returns the
    /// reader and the observer.
    pub fn finish(mut self, worker: &mut Worker) -> (R, O) {
        if self.held_back {
            self.held_back = false;
            self.observer.backpressured(false);
        }
        if self.source.in_epoch > 0 {
            self.close_epoch();
        }
        // Closing the input: the handle the dataflow reads from goes; a detached one stays.
        drop(std::mem::replace(&mut self.input, InputHandle::new()));
        while !self.probe.done() {
            worker.step_or_park(Some(Duration::from_millis(5)));
            self.advance_commits(self.durable_frontier(), self.settings.commit_interval, false);
        }
        self.advance_commits(u64::MAX, Duration::ZERO, true);
        while !self.commits.idle() {
            std::thread::sleep(Duration::from_millis(5));
            self.commits.mirror(&mut self.reader);
        }
        self.commits.mirror(&mut self.reader);
        self.reader.finish();
        (self.reader, self.observer)
    }

    /// The commit stage: epochs before `durable` are done; their offsets go out (see
    /// [`crate::commit`]).
    fn advance_commits(&mut self, durable: u64, interval: Duration, force: bool) {
        let observer = &mut self.observer;
        self.commits.advance(durable, &mut self.source.closed, interval, force, &mut self.reader, |p| {
            observer.epoch_durable(p)
        });
    }

    fn close_epoch(&mut self) {
        let epoch = *self.input.time();
        self.source.close_epoch(epoch, self.reader.next_offsets());
        self.input.advance_to((epoch + 1).max(clock_epoch()));
    }
}

/// The epoch of this moment: microseconds since the Unix epoch (see the module's comment).
fn clock_epoch() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Runs one worker until `shutdown` is set or, with `exit_when_idle`, until its partitions
/// are read to their ends, durable and committed; then drains (see [`Ingest::finish`]).
pub fn run_worker<R, C, O, W, F>(
    worker: &mut Worker,
    settings: IngestSettings,
    reader: R,
    committer: C,
    make_writer: F,
    observer: O,
    shutdown: &AtomicBool,
) -> Result<(R, O), Stop>
where
    R: PartitionReader,
    C: OffsetCommitter,
    O: Observer,
    W: EpochWriter<R::Record>,
    F: FnMut(usize, Durable) -> W,
{
    let mut ingest = Ingest::new(worker, settings, reader, committer, make_writer, observer);
    while !shutdown.load(Ordering::Relaxed) {
        if ingest.turn(worker)? == Turn::Idle {
            break;
        }
    }
    Ok(ingest.finish(worker))
}
