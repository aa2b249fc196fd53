//! Watching the partitions a source worker reads, so that nothing Kafka or an operator does
//! goes unnoticed: pure bookkeeping, fed by the worker loop, unit-tested here.
//!
//! - [`StallDetector`]: a partition with messages to read that yields none for a while (a
//!   batch that cannot be decoded, an authorization error, a broker that stopped serving it)
//!   is *stalled*: counted, shown in `/healthz`, and after `--stall-timeout` the job stops
//!   with one line instead of retrying silently forever.
//! - [`OffsetWatch`]: the offset each partition must deliver next. A message or a high
//!   watermark below it means the topic was deleted and recreated or truncated (the job
//!   stops: its exactly-once watermarks would drop the new messages as replays). A message
//!   above it is normal on transactional topics (commit markers, aborted records take
//!   offsets), so a jump is only counted as lost to retention when the partition's low
//!   watermark proves the skipped offsets were deleted.
//! - [`check_start`]: the same comparisons at start, between a committed offset and the
//!   partition's low and high watermarks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What waits to be read in a partition, as the last periodic check saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backlog {
    /// Nothing: the partition is at its end.
    Empty,
    /// This many messages between the next offset to read and the partition's end.
    Messages(i64),
    /// The partition's end could not be queried (the broker does not answer for it).
    Unknown,
}

impl std::fmt::Display for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backlog::Empty => write!(f, "nothing waits to be read"),
            Backlog::Messages(n) => write!(f, "{n} messages wait to be read"),
            Backlog::Unknown => write!(f, "its end offset cannot be queried"),
        }
    }
}

/// A change of a partition's state found by [`StallDetector::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StallChange {
    /// Newly stalled: no message for `quiet` although `backlog` waits.
    Stalled { partition: i32, quiet: Duration, backlog: Backlog },
    /// A stalled partition delivered a message again, or has nothing left to read.
    Recovered { partition: i32 },
}

/// Finds partitions that should deliver messages and do not.
///
/// A partition's quiet time runs while it has a backlog (or its backlog cannot be known) and
/// the reader is reading: a message, an empty backlog, or the reader being held back by
/// backpressure (the job chose not to read) restart it.
#[derive(Debug)]
pub struct StallDetector {
    /// Quiet time after which a partition with a backlog counts as stalled.
    after: Duration,
    partitions: BTreeMap<i32, PartitionQuiet>,
    /// Partitions that recovered since the last `check`.
    recovered: Vec<i32>,
}

#[derive(Debug)]
struct PartitionQuiet {
    /// Since when the partition has delivered nothing while it should have.
    since: Instant,
    backlog: Backlog,
    stalled: bool,
}

impl StallDetector {
    pub fn new(after: Duration) -> Self {
        StallDetector { after, partitions: BTreeMap::new(), recovered: Vec::new() }
    }

    /// Starts watching a partition (at start, or when it was added to the topic).
    pub fn add(&mut self, partition: i32, now: Instant) {
        self.partitions.entry(partition).or_insert(PartitionQuiet {
            since: now,
            backlog: Backlog::Empty,
            stalled: false,
        });
    }

    /// A message of the partition arrived.
    pub fn message(&mut self, partition: i32, now: Instant) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.since = now;
            if p.stalled {
                p.stalled = false;
                self.recovered.push(partition);
            }
        }
    }

    /// The reader is not reading (backpressure): quiet time does not count.
    pub fn held_back(&mut self, now: Instant) {
        for p in self.partitions.values_mut() {
            p.since = now;
        }
    }

    /// The periodic check's view of what waits in the partition.
    pub fn backlog(&mut self, partition: i32, backlog: Backlog, now: Instant) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.backlog = backlog;
            if backlog == Backlog::Empty {
                p.since = now;
                if p.stalled {
                    p.stalled = false;
                    self.recovered.push(partition);
                }
            }
        }
    }

    /// Partitions that became stalled or recovered since the last call.
    pub fn check(&mut self, now: Instant) -> Vec<StallChange> {
        let mut changes: Vec<StallChange> =
            self.recovered.drain(..).map(|partition| StallChange::Recovered { partition }).collect();
        for (partition, p) in &mut self.partitions {
            let quiet = now.saturating_duration_since(p.since);
            if !p.stalled && p.backlog != Backlog::Empty && quiet >= self.after {
                p.stalled = true;
                changes.push(StallChange::Stalled { partition: *partition, quiet, backlog: p.backlog });
            }
        }
        changes
    }

    /// The stalled partition that has been quiet longest, and for how long.
    pub fn longest(&self, now: Instant) -> Option<(i32, Duration, Backlog)> {
        self.partitions
            .iter()
            .filter(|(_, p)| p.stalled)
            .map(|(partition, p)| (*partition, now.saturating_duration_since(p.since), p.backlog))
            .max_by_key(|(_, quiet, _)| *quiet)
    }

    /// Whether the partition is stalled now.
    pub fn is_stalled(&self, partition: i32) -> bool {
        self.partitions.get(&partition).is_some_and(|p| p.stalled)
    }
}

/// The topic was deleted and recreated, or truncated, under a running job.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicReset {
    #[error("partition {partition} went back: Kafka delivered offset {offset} where {expected} was next")]
    Backwards { partition: i32, expected: i64, offset: i64 },
    #[error("partition {partition} now ends at offset {end}, below the {expected} already read")]
    BeyondEnd { partition: i32, expected: i64, end: i64 },
    #[error("the topic now has {partitions} partitions, but partition {partition} was read")]
    PartitionGone { partition: i32, partitions: i32 },
}

/// Offsets deleted by retention before the job read them: `from..to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

impl Gap {
    pub fn count(&self) -> i64 {
        self.to - self.from
    }
}

/// Most jumps remembered per partition between two watermark checks. A transactional topic
/// makes a jump per transaction (its commit marker); retention makes few and large ones, so
/// on overflow the smallest jump is forgotten.
const MAX_JUMPS: usize = 64;

/// The next offset each partition must deliver, and the jumps not yet explained.
#[derive(Debug, Default)]
pub struct OffsetWatch {
    partitions: BTreeMap<i32, Expected>,
}

#[derive(Debug, Default)]
struct Expected {
    /// The next offset to read, once known (an explicit start or a message read).
    next: Option<i64>,
    /// Offset ranges `from..to` passed without a message, not yet compared with the low
    /// watermark.
    jumps: Vec<(i64, i64)>,
}

impl OffsetWatch {
    /// Starts watching a partition; `next` is its start offset when known.
    pub fn add(&mut self, partition: i32, next: Option<i64>) {
        self.partitions.entry(partition).or_default().next = next;
    }

    /// A message of the partition arrived. An offset below the expected one means the topic
    /// went back under the job: that message must not be written.
    pub fn message(&mut self, partition: i32, offset: i64) -> Result<(), TopicReset> {
        let p = self.partitions.entry(partition).or_default();
        match p.next {
            Some(expected) if offset < expected => {
                return Err(TopicReset::Backwards { partition, expected, offset });
            }
            Some(expected) if offset > expected => remember_jump(&mut p.jumps, expected, offset),
            _ => {}
        }
        p.next = Some(offset + 1);
        Ok(())
    }

    /// The consumer's position: past control records (transaction markers) and aborted
    /// records the application never sees. Never moves the expected offset back.
    pub fn position(&mut self, partition: i32, position: i64) {
        let Some(p) = self.partitions.get_mut(&partition) else { return };
        match p.next {
            Some(next) if position > next => {
                remember_jump(&mut p.jumps, next, position);
                p.next = Some(position);
            }
            None if position >= 0 => p.next = Some(position),
            _ => {}
        }
    }

    /// Compares with the partition's watermarks: a high watermark below the expected offset
    /// is a reset; jumps below the low watermark were retention deleting unread messages
    /// (each reported once).
    pub fn watermarks(&mut self, partition: i32, low: i64, high: i64) -> Result<Vec<Gap>, TopicReset> {
        let Some(p) = self.partitions.get_mut(&partition) else { return Ok(Vec::new()) };
        if let Some(expected) = p.next {
            if high < expected {
                return Err(TopicReset::BeyondEnd { partition, expected, end: high });
            }
        }
        // Offsets below `low` are gone now; offsets passed without a message were there when
        // they were passed unless they were already below the low watermark then. The low
        // watermark only grows, so a jump that starts at or above it now was never a deletion.
        let mut gaps: Vec<Gap> = p
            .jumps
            .drain(..)
            .filter(|(from, _)| *from < low)
            .map(|(from, to)| Gap { partition, from, to: to.min(low) })
            .collect();
        gaps.sort_by_key(|g| g.from);
        Ok(gaps)
    }

    /// What waits in the partition: between the next offset to read (or the low watermark
    /// while nothing is known) and the high watermark.
    pub fn backlog(&self, partition: i32, low: i64, high: i64) -> i64 {
        let next = self.next(partition).unwrap_or(low).max(low);
        (high - next).max(0)
    }

    pub fn next(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).and_then(|p| p.next)
    }

    /// The next offset to read of every partition where it is known.
    pub fn next_offsets(&self) -> Vec<(i32, i64)> {
        self.partitions.iter().filter_map(|(p, e)| e.next.map(|n| (*p, n))).collect()
    }

    pub fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }
}

fn remember_jump(jumps: &mut Vec<(i64, i64)>, from: i64, to: i64) {
    jumps.push((from, to));
    if jumps.len() > MAX_JUMPS {
        if let Some(smallest) = jumps.iter().enumerate().min_by_key(|(_, (f, t))| t - f).map(|(i, _)| i) {
            jumps.remove(smallest);
        }
    }
}

/// What a committed offset says about its partition at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartCheck {
    /// Within the partition: resume there.
    Fine,
    /// Retention deleted `from..to` before the job read it: resume at `to`, report the gap.
    Gap { from: i64, to: i64 },
    /// Beyond the partition's end: the topic was deleted and recreated, or truncated.
    BeyondEnd { committed: i64, end: i64 },
}

/// Compares a committed offset (next to read) with a partition's low and high watermarks.
pub fn check_start(committed: i64, low: i64, high: i64) -> StartCheck {
    if committed > high {
        StartCheck::BeyondEnd { committed, end: high }
    } else if committed < low {
        StartCheck::Gap { from: committed, to: low }
    } else {
        StartCheck::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(30);

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn a_partition_with_a_backlog_and_no_messages_stalls_after_the_bound() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(AFTER);
        d.add(0, t0);
        d.add(1, t0);
        d.backlog(0, Backlog::Messages(500), at(t0, 5));
        d.backlog(1, Backlog::Messages(500), at(t0, 5));
        d.message(1, at(t0, 20));
        assert!(d.check(at(t0, 29)).is_empty());
        assert_eq!(
            d.check(at(t0, 31)),
            vec![StallChange::Stalled {
                partition: 0,
                quiet: Duration::from_secs(31),
                backlog: Backlog::Messages(500)
            }]
        );
        // Counted once, not on every check.
        assert!(d.check(at(t0, 40)).is_empty());
        assert!(d.is_stalled(0) && !d.is_stalled(1));
        assert_eq!(d.longest(at(t0, 100)), Some((0, Duration::from_secs(100), Backlog::Messages(500))));
    }

    #[test]
    fn an_idle_partition_at_its_end_never_stalls() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(AFTER);
        d.add(0, t0);
        d.backlog(0, Backlog::Empty, at(t0, 100));
        assert!(d.check(at(t0, 120)).is_empty());
        d.backlog(0, Backlog::Empty, at(t0, 1000));
        assert!(d.check(at(t0, 1000)).is_empty());
        assert_eq!(d.longest(at(t0, 1000)), None);
    }

    #[test]
    fn backpressure_stops_the_clock() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(AFTER);
        d.add(0, t0);
        d.backlog(0, Backlog::Messages(10_000), t0);
        // Held back by the database for a minute: not the partition's fault.
        for s in 0..60 {
            d.held_back(at(t0, s));
        }
        assert!(d.check(at(t0, 60)).is_empty());
        assert!(!d.check(at(t0, 90)).is_empty(), "reading again for 30 s with nothing delivered");
    }

    #[test]
    fn an_unknown_end_counts_as_a_backlog() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(AFTER);
        d.add(3, t0);
        d.backlog(3, Backlog::Unknown, t0);
        assert_eq!(
            d.check(at(t0, 30)),
            vec![StallChange::Stalled { partition: 3, quiet: AFTER, backlog: Backlog::Unknown }]
        );
    }

    #[test]
    fn a_message_or_an_empty_backlog_ends_a_stall() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(AFTER);
        d.add(0, t0);
        d.add(1, t0);
        d.backlog(0, Backlog::Messages(1), t0);
        d.backlog(1, Backlog::Messages(1), t0);
        assert_eq!(d.check(at(t0, 31)).len(), 2);
        d.message(0, at(t0, 32));
        d.backlog(1, Backlog::Empty, at(t0, 33));
        assert_eq!(
            d.check(at(t0, 34)),
            vec![StallChange::Recovered { partition: 0 }, StallChange::Recovered { partition: 1 }]
        );
        assert_eq!(d.longest(at(t0, 34)), None);
    }

    #[test]
    fn an_added_partition_starts_its_own_clock() {
        let t0 = Instant::now();
        let mut d = StallDetector::new(AFTER);
        d.add(0, t0);
        d.add(5, at(t0, 100));
        d.backlog(5, Backlog::Messages(7), at(t0, 100));
        assert!(d.check(at(t0, 120)).is_empty());
        assert_eq!(d.check(at(t0, 130)).len(), 1);
    }

    #[test]
    fn offsets_in_order_are_fine_and_a_step_back_is_a_reset() {
        let mut w = OffsetWatch::default();
        w.add(0, Some(100));
        assert_eq!(w.message(0, 100), Ok(()));
        assert_eq!(w.message(0, 101), Ok(()));
        assert_eq!(w.next(0), Some(102));
        // The broker reset the consumer to the start of a recreated topic.
        assert_eq!(w.message(0, 0), Err(TopicReset::Backwards { partition: 0, expected: 102, offset: 0 }));
        // A replayed offset is a reset too (never happens with one reader per partition).
        assert!(w.message(0, 101).is_err());
    }

    #[test]
    fn an_end_below_what_was_read_is_a_reset() {
        let mut w = OffsetWatch::default();
        w.add(2, Some(5000));
        assert_eq!(w.watermarks(2, 0, 5000), Ok(vec![]));
        assert_eq!(w.watermarks(2, 0, 12), Err(TopicReset::BeyondEnd { partition: 2, expected: 5000, end: 12 }));
        // Nothing known yet: nothing to compare.
        w.add(3, None);
        assert_eq!(w.watermarks(3, 0, 0), Ok(vec![]));
    }

    #[test]
    fn transaction_markers_make_jumps_that_are_not_gaps() {
        let mut w = OffsetWatch::default();
        w.add(0, Some(0));
        // Offsets 10 and 21 are commit markers; 30..40 an aborted transaction plus its marker.
        for o in (0..10).chain(11..21).chain(22..30).chain(41..50) {
            w.message(0, o).unwrap();
        }
        assert_eq!(w.watermarks(0, 0, 51), Ok(vec![]));
        // The position moves past a trailing marker: lag reaches 0.
        w.position(0, 51);
        assert_eq!(w.backlog(0, 0, 51), 0);
        assert_eq!(w.next_offsets(), vec![(0, 51)]);
        assert_eq!(w.watermarks(0, 0, 51), Ok(vec![]));
    }

    #[test]
    fn a_jump_below_the_low_watermark_is_a_gap_of_deleted_messages() {
        let mut w = OffsetWatch::default();
        w.add(1, Some(100));
        w.message(1, 100).unwrap();
        // Retention deleted 101..1000 before the job got there; the consumer was reset to 1000.
        w.message(1, 1000).unwrap();
        w.message(1, 1001).unwrap();
        assert_eq!(w.watermarks(1, 1000, 2000), Ok(vec![Gap { partition: 1, from: 101, to: 1000 }]));
        // Reported once.
        assert_eq!(w.watermarks(1, 1000, 2000), Ok(vec![]));
    }

    #[test]
    fn only_what_the_low_watermark_proves_deleted_is_counted() {
        let mut w = OffsetWatch::default();
        w.add(0, Some(0));
        w.message(0, 0).unwrap();
        // A jump of 50 (an aborted transaction), then retention removes the first 20 offsets.
        w.message(0, 51).unwrap();
        let gaps = w.watermarks(0, 20, 60).unwrap();
        assert_eq!(gaps, vec![Gap { partition: 0, from: 1, to: 20 }]);
        assert_eq!(gaps[0].count(), 19);
    }

    #[test]
    fn a_position_past_a_deleted_range_is_a_gap_too() {
        let mut w = OffsetWatch::default();
        w.add(0, Some(10));
        // Reset to the low watermark 500, where the first record is a control record.
        w.position(0, 501);
        assert_eq!(w.watermarks(0, 500, 501), Ok(vec![Gap { partition: 0, from: 10, to: 500 }]));
        // A position behind the expected offset (before the first fetch) changes nothing.
        w.position(0, -1001);
        assert_eq!(w.next(0), Some(501));
    }

    #[test]
    fn a_start_from_earliest_learns_its_offset_from_the_first_message_or_position() {
        let mut w = OffsetWatch::default();
        w.add(0, None);
        w.add(1, None);
        assert_eq!(w.backlog(0, 40, 100), 60);
        w.message(0, 40).unwrap();
        assert_eq!(w.backlog(0, 40, 100), 59);
        w.position(1, 7);
        assert_eq!(w.next_offsets(), vec![(0, 41), (1, 7)]);
    }

    #[test]
    fn many_small_jumps_do_not_crowd_out_a_large_one() {
        let mut w = OffsetWatch::default();
        w.add(0, Some(0));
        let mut o = 0;
        w.message(0, o).unwrap();
        o += 1_000; // 1..1000 deleted
        for _ in 0..500 {
            w.message(0, o).unwrap();
            o += 2; // a commit marker after every record
        }
        assert_eq!(w.watermarks(0, 1_000, o), Ok(vec![Gap { partition: 0, from: 1, to: 1_000 }]));
    }

    #[test]
    fn start_offsets_are_checked_against_the_partition() {
        assert_eq!(check_start(100, 0, 200), StartCheck::Fine);
        assert_eq!(check_start(200, 0, 200), StartCheck::Fine);
        assert_eq!(check_start(0, 0, 0), StartCheck::Fine);
        assert_eq!(check_start(5000, 0, 12), StartCheck::BeyondEnd { committed: 5000, end: 12 });
        assert_eq!(check_start(100, 700, 900), StartCheck::Gap { from: 100, to: 700 });
    }
}
