//! The commit stage: offsets of epochs behind the durable frontier go to the
//! [`OffsetCommitter`], at most once per commit interval, and then to the reader to mirror.
//!
//! This is the product's promise in one place: an epoch's offsets are released only when
//! the durable frontier has passed the epoch, that is when every worker's records of it and
//! of every earlier epoch are durable. A restart resumes from committed offsets, so nothing
//! committed can be missing; what was durable but not yet committed is read again, and the
//! writers' watermarks drop it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::source::{ClosedEpoch, PartitionReader};

/// Stores a worker's committed offsets, in order, in the same place the writers write (so a
/// restart finds them beside the rows). Must not block: the job's committer is a tokio task
/// that retries through outages (`fleetflow::sink::offsets::Committer`).
pub trait OffsetCommitter {
    /// Queues `offsets` (the next offset to read, per partition of this worker) and returns
    /// the commit's sequence number, 1 for the first.
    fn commit(&mut self, offsets: Vec<(i32, i64)>) -> u64;
    /// The highest sequence number known to be stored.
    fn done(&self) -> u64;
}

/// Tracks one worker's closed epochs against the durable frontier.
pub(crate) struct Commits<C> {
    committer: C,
    sent: u64,
    /// Offsets of the newest durable epoch, not yet sent.
    ready: Option<Vec<(i32, i64)>>,
    last: Instant,
    /// A commit sent whose offsets go to the reader once it is stored.
    mirror_after: Option<(u64, Vec<(i32, i64)>)>,
    committed: Vec<(i32, i64)>,
}

impl<C: OffsetCommitter> Commits<C> {
    pub fn new(committer: C) -> Self {
        Commits { committer, sent: 0, ready: None, last: Instant::now(), mirror_after: None, committed: Vec::new() }
    }

    /// Takes the closed epochs before `durable` (the durable frontier: the least epoch not
    /// yet durable everywhere) and commits the newest one's offsets when `interval` has
    /// passed since the last commit (or `force`). Calls `durable_epoch` with each epoch's
    /// produce times.
    pub fn advance<R: PartitionReader>(
        &mut self,
        durable: u64,
        closed: &mut VecDeque<ClosedEpoch>,
        interval: Duration,
        force: bool,
        reader: &mut R,
        mut durable_epoch: impl FnMut(&[i64]),
    ) {
        while let Some(done) = closed.pop_front_if(|c| c.epoch < durable) {
            durable_epoch(&done.produced_ms);
            self.ready = Some(done.offsets);
        }
        if self.ready.as_ref() == Some(&self.committed) {
            self.ready = None;
        }
        if self.ready.is_some() && (force || self.last.elapsed() >= interval) {
            let offsets = self.ready.take().unwrap_or_default();
            self.sent = self.committer.commit(offsets.clone());
            self.mirror_after = Some((self.sent, offsets.clone()));
            self.committed = offsets;
            self.last = Instant::now();
        }
        self.mirror(reader);
    }

    /// Hands the reader the offsets of the last commit once it is stored.
    pub fn mirror<R: PartitionReader>(&mut self, reader: &mut R) {
        if let Some((_, offsets)) = self.mirror_after.take_if(|(seq, _)| self.committer.done() >= *seq) {
            reader.committed(&offsets);
        }
    }

    /// Nothing waits to be committed or stored.
    pub fn idle(&self) -> bool {
        self.ready.is_none() && self.committer.done() >= self.sent
    }
}
