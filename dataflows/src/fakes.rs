//! In-memory implementations of the reader, the writers and the committer, for the crate's
//! tests and examples: a topic whose partitions are vectors, and a database that keeps rows,
//! per-(key group, partition) watermarks and committed offsets the way the job's does.
//!
//! The database checks the core promise at every commit: every offset below a committed
//! offset is durable ([`FakeDatabase::violations`] lists each commit that broke it). Its
//! writers either report each epoch durable at once ([`FakeDatabase::completing`]) or keep
//! them pending until the test completes them, in any order ([`FakeDatabase::manual`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::commit::OffsetCommitter;
use crate::durable_sink::{Durable, EpochWriter};
use crate::routing::KEY_GROUPS;
use crate::source::{PartitionReader, Record, Stop};

/// A record of a [`FakeTopic`]: where it is, and its key group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FakeRecord {
    /// Decides the worker that writes it.
    pub key_group: u16,
    /// Where it is in the topic.
    pub partition: i32,
    /// Where it is in its partition.
    pub offset: i64,
}

impl FakeRecord {
    /// The record at `offset` of `partition`, in a key group that varies with both (so
    /// records of one partition go to several workers, as real serverIds do).
    pub fn new(partition: i32, offset: i64) -> Self {
        let key_group = (offset.wrapping_mul(31).wrapping_add(partition as i64 * 7)).rem_euclid(KEY_GROUPS as i64);
        FakeRecord { key_group: key_group as u16, partition, offset }
    }
}

impl Record for FakeRecord {
    fn key_group(&self) -> u16 {
        self.key_group
    }
    fn partition(&self) -> i32 {
        self.partition
    }
    fn offset(&self) -> i64 {
        self.offset
    }
    fn approx_bytes(&self) -> usize {
        100
    }
}

/// A topic: for each partition, how many records it holds (record `o` of partition `p` is
/// `FakeRecord::new(p, o)`). Shared: producing while a worker reads is fine.
#[derive(Clone, Default)]
pub struct FakeTopic {
    ends: Arc<Mutex<BTreeMap<i32, i64>>>,
}

impl FakeTopic {
    /// A topic with `partitions` empty partitions.
    pub fn new(partitions: i32) -> Self {
        let topic = FakeTopic::default();
        lock(&topic.ends).extend((0..partitions).map(|p| (p, 0)));
        topic
    }

    /// Appends `n` records to `partition`.
    pub fn produce(&self, partition: i32, n: i64) {
        *lock(&self.ends).entry(partition).or_insert(0) += n;
    }

    /// The offset the next record of `partition` gets.
    pub fn end(&self, partition: i32) -> i64 {
        lock(&self.ends).get(&partition).copied().unwrap_or(0)
    }

    /// A reader of `partitions`, starting at the offsets committed in `database` (else 0).
    pub fn reader(&self, partitions: &[i32], database: &FakeDatabase) -> FakeReader {
        let committed = database.committed();
        FakeReader {
            topic: self.clone(),
            next: partitions.iter().map(|p| (*p, committed.get(p).copied().unwrap_or(0))).collect(),
            paused: false,
            mirrored: Vec::new(),
        }
    }
}

/// Reads some partitions of a [`FakeTopic`], one record of each in turn.
pub struct FakeReader {
    topic: FakeTopic,
    next: BTreeMap<i32, i64>,
    /// Whether the worker asked it to stop fetching.
    pub paused: bool,
    /// Offsets the worker mirrored after each stored commit.
    pub mirrored: Vec<Vec<(i32, i64)>>,
}

impl PartitionReader for FakeReader {
    type Record = FakeRecord;

    fn read(&mut self, mut emit: impl FnMut(FakeRecord, Option<i64>) -> bool) -> Result<usize, Stop> {
        let mut read = 0;
        loop {
            let mut progressed = false;
            for (partition, next) in self.next.iter_mut() {
                if *next < self.topic.end(*partition) {
                    let record = FakeRecord::new(*partition, *next);
                    *next += 1;
                    read += 1;
                    progressed = true;
                    if !emit(record, None) {
                        return Ok(read);
                    }
                }
            }
            if !progressed {
                return Ok(read);
            }
        }
    }

    fn next_offsets(&self) -> Vec<(i32, i64)> {
        self.next.iter().map(|(p, o)| (*p, *o)).collect()
    }

    fn at_end(&self) -> bool {
        self.next.iter().all(|(p, o)| *o >= self.topic.end(*p))
    }

    fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    fn committed(&mut self, offsets: &[(i32, i64)]) {
        self.mirrored.push(offsets.to_vec());
    }
}

#[derive(Default)]
struct State {
    complete_at_once: bool,
    /// Writes handed over and not yet durable: (epoch, records, how to report it).
    pending: Vec<(u64, Vec<FakeRecord>, Durable)>,
    rows: Vec<FakeRecord>,
    watermarks: HashMap<(u16, i32), i64>,
    committed: BTreeMap<i32, i64>,
    commits: u64,
    violations: Vec<String>,
    /// Records handed to writers, replays included.
    written: usize,
}

impl State {
    /// Makes a write durable the way the job's writer does: in one transaction, rows whose
    /// offset is above their (key group, partition) watermark, and the raised watermarks.
    fn make_durable(&mut self, records: Vec<FakeRecord>) {
        for r in records {
            let mark = self.watermarks.entry((r.key_group, r.partition)).or_insert(-1);
            if r.offset > *mark {
                *mark = r.offset;
                self.rows.push(r);
            }
        }
    }
}

/// A database: rows, watermarks and committed offsets. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct FakeDatabase {
    state: Arc<Mutex<State>>,
}

impl FakeDatabase {
    /// Its writers report every epoch durable as soon as they are given it.
    pub fn completing() -> Self {
        let db = FakeDatabase::default();
        lock(&db.state).complete_at_once = true;
        db
    }

    /// Its writers keep every write pending until [`FakeDatabase::complete`].
    pub fn manual() -> Self {
        FakeDatabase::default()
    }

    /// A writer for connection `_connection`, reporting through `durable`.
    pub fn writer(&self, _connection: usize, durable: Durable) -> FakeWriter {
        FakeWriter { database: self.clone(), durable }
    }

    /// A committer storing offsets here, at once.
    pub fn committer(&self) -> FakeCommitter {
        FakeCommitter { database: self.clone() }
    }

    /// The epochs of the pending writes, in the order they were handed over.
    pub fn pending(&self) -> Vec<u64> {
        lock(&self.state).pending.iter().map(|(e, _, _)| *e).collect()
    }

    /// Makes the `index`-th pending write durable and reports it.
    pub fn complete(&self, index: usize) {
        let (epoch, records, durable) = {
            let mut state = lock(&self.state);
            let (epoch, records, durable) = state.pending.remove(index);
            state.make_durable(records.clone());
            (epoch, records, durable)
        };
        drop(records);
        durable.epoch(epoch);
    }

    /// Makes every pending write durable.
    pub fn complete_all(&self) {
        while !self.pending().is_empty() {
            self.complete(0);
        }
    }

    /// A crash: every write not yet durable is lost.
    pub fn lose_pending(&self) {
        lock(&self.state).pending.clear();
    }

    /// The durable offsets of `partition`, ascending.
    pub fn durable_offsets(&self, partition: i32) -> Vec<i64> {
        let mut offsets: Vec<i64> =
            lock(&self.state).rows.iter().filter(|r| r.partition == partition).map(|r| r.offset).collect();
        offsets.sort_unstable();
        offsets
    }

    /// Every durable row.
    pub fn rows(&self) -> Vec<FakeRecord> {
        lock(&self.state).rows.clone()
    }

    /// Records handed to the writers so far, replays included.
    pub fn written(&self) -> usize {
        lock(&self.state).written
    }

    /// The committed offset (next to read) per partition.
    pub fn committed(&self) -> BTreeMap<i32, i64> {
        lock(&self.state).committed.clone()
    }

    /// Each commit that released an offset whose records were not all durable.
    pub fn violations(&self) -> Vec<String> {
        lock(&self.state).violations.clone()
    }
}

/// A writer of a [`FakeDatabase`].
pub struct FakeWriter {
    database: FakeDatabase,
    durable: Durable,
}

impl EpochWriter<FakeRecord> for FakeWriter {
    fn write(&mut self, epoch: u64, batches: Vec<Vec<FakeRecord>>) {
        let records: Vec<FakeRecord> = batches.into_iter().flatten().collect();
        let mut state = lock(&self.database.state);
        state.written += records.len();
        if state.complete_at_once {
            state.make_durable(records);
            drop(state);
            self.durable.epoch(epoch);
        } else {
            state.pending.push((epoch, records, self.durable.clone()));
        }
    }
}

/// The committer of a [`FakeDatabase`]: stores at once, and checks the promise.
pub struct FakeCommitter {
    database: FakeDatabase,
}

impl OffsetCommitter for FakeCommitter {
    fn commit(&mut self, offsets: Vec<(i32, i64)>) -> u64 {
        let mut state = lock(&self.database.state);
        for (partition, next) in offsets {
            let mut durable: Vec<i64> =
                state.rows.iter().filter(|r| r.partition == partition).map(|r| r.offset).collect();
            durable.sort_unstable();
            durable.dedup();
            // Offsets 0..next must all be durable.
            if durable.iter().take_while(|o| **o < next).count() as i64 != next {
                let missing = (0..next).find(|o| durable.binary_search(o).is_err());
                let line = format!(
                    "commit {} released partition {partition} up to {next}, but offset {missing:?} is not durable",
                    state.commits + 1
                );
                state.violations.push(line);
            }
            state.committed.insert(partition, next);
        }
        state.commits += 1;
        state.commits
    }

    fn done(&self) -> u64 {
        lock(&self.database.state).commits
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked holding the lock already failed; keep the data readable.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
