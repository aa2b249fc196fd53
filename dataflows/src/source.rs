//! The source side of a worker: what it is given to read, and how it cuts what it reads
//! into epochs.
//!
//! A worker reads its partitions through a [`PartitionReader`] and stamps each record with
//! the open epoch. It closes the epoch after `epoch_records` records, `epoch_bytes` bytes or
//! `epoch_interval`, remembering the next offset of every partition at that moment: those
//! are the offsets to commit once the epoch is durable (see [`crate::commit`]).

use std::collections::VecDeque;
use std::time::Instant;

/// A record as the dataflow sees it: where it came from and the key group that decides which
/// worker writes it. Everything else about it is the writer's business.
pub trait Record: timely::ExchangeData + Clone {
    /// Decides the sink worker, and the watermark the writer checks a replay against.
    fn key_group(&self) -> u16;
    /// The partition it was read from.
    fn partition(&self) -> i32;
    /// Its offset in that partition.
    fn offset(&self) -> i64;
    /// About how many bytes it holds in memory, for the in-flight byte bound.
    fn approx_bytes(&self) -> usize;
}

/// Why a worker stops before its work is done: the one line the job stops with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop(pub String);

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Stop {}

/// Reads the partitions one worker owns. Never blocks: the worker loop calls it between
/// steps of the dataflow. The job implements it with an rdkafka consumer
/// (`fleetflow::kafka::source`); [`crate::fakes::FakeTopic`] is an in-memory one.
pub trait PartitionReader {
    /// What it reads.
    type Record: Record;

    /// Hands the records that are ready to `emit`, each with the time it was produced (ms
    /// since the Unix epoch, for the produce-to-durable latency), for as long as `emit`
    /// returns `true`. Returns how many it handed over. `Err` when the partitions can no
    /// longer be read as they were (the topic was recreated under the job): stop.
    fn read(&mut self, emit: impl FnMut(Self::Record, Option<i64>) -> bool) -> Result<usize, Stop>;

    /// The next offset to read, per partition: what a commit of everything read so far
    /// stores. It may move without records (past transaction markers, or a retention gap).
    fn next_offsets(&self) -> Vec<(i32, i64)>;

    /// True when every partition has been read to its end (as far as the reader knows).
    fn at_end(&self) -> bool;

    /// Stops (`true`) or restarts fetching. Called once the worker has been held back by the
    /// in-flight bound for a while, so nothing piles up below the reader either.
    fn set_paused(&mut self, _paused: bool) {}

    /// The worker did not read this turn (backpressure): a quiet partition is not to blame.
    fn held_back(&mut self) {}

    /// Once per turn of the worker loop: periodic checks (lag, stalls, topic changes).
    /// `Err` stops the job.
    fn tick(&mut self) -> Result<(), Stop> {
        Ok(())
    }

    /// `offsets` are committed (durably, in the committer's store): a place to mirror them
    /// to, such as Kafka's consumer group, for tools that watch it.
    fn committed(&mut self, _offsets: &[(i32, i64)]) {}

    /// The worker is done with the reader.
    fn finish(&mut self) {}
}

/// Messages handed over between two steps of the dataflow.
pub(crate) const READ_BUDGET: usize = 4096;

/// The epoch bookkeeping of one source worker.
pub(crate) struct Source {
    /// The next offsets when the last epoch closed (or at the start).
    pub last_closed: Vec<(i32, i64)>,
    /// Records in the open epoch, their bytes in memory, and when its first one arrived.
    pub in_epoch: usize,
    pub bytes_in_epoch: usize,
    pub opened: Instant,
    /// Produce times (ms) of the open epoch's records, for the latency.
    produced_ms: Vec<i64>,
    /// Closed epochs not yet durable, oldest first.
    pub closed: VecDeque<ClosedEpoch>,
}

/// An epoch the source has closed: what to commit, and what to measure, once it is durable.
pub(crate) struct ClosedEpoch {
    pub epoch: u64,
    /// Next offset to read per partition when the epoch closed.
    pub offsets: Vec<(i32, i64)>,
    pub produced_ms: Vec<i64>,
    /// Bytes of its records in memory until it is durable.
    pub bytes: usize,
}

impl Source {
    pub fn new(start: Vec<(i32, i64)>) -> Self {
        Source {
            last_closed: start,
            in_epoch: 0,
            bytes_in_epoch: 0,
            opened: Instant::now(),
            produced_ms: Vec::new(),
            closed: VecDeque::new(),
        }
    }

    /// Bytes of records read and not yet durable (the open epoch and the closed ones).
    pub fn bytes_in_flight(&self) -> usize {
        self.bytes_in_epoch + self.closed.iter().map(|c| c.bytes).sum::<usize>()
    }

    /// Reads up to the read budget or the room left in the epoch, sending each record into
    /// the dataflow with `send`; returns how many were read.
    pub fn read<R: PartitionReader>(
        &mut self,
        reader: &mut R,
        (epoch_records, epoch_bytes): (usize, usize),
        mut send: impl FnMut(R::Record),
    ) -> Result<usize, Stop> {
        if self.in_epoch >= epoch_records || self.bytes_in_epoch >= epoch_bytes {
            return Ok(0);
        }
        let mut read = 0;
        reader.read(|record, produced_ms| {
            if self.in_epoch == 0 {
                self.opened = Instant::now();
            }
            self.bytes_in_epoch += record.approx_bytes();
            self.produced_ms.extend(produced_ms);
            send(record);
            self.in_epoch += 1;
            read += 1;
            read < READ_BUDGET && self.in_epoch < epoch_records && self.bytes_in_epoch < epoch_bytes
        })?;
        Ok(read)
    }

    /// Closes epoch `epoch` with the reader's next offsets.
    pub fn close_epoch(&mut self, epoch: u64, next_offsets: Vec<(i32, i64)>) {
        self.last_closed = next_offsets;
        let produced_ms = std::mem::take(&mut self.produced_ms);
        let bytes = std::mem::take(&mut self.bytes_in_epoch);
        self.closed.push_back(ClosedEpoch { epoch, offsets: self.last_closed.clone(), produced_ms, bytes });
        self.in_epoch = 0;
    }
}
