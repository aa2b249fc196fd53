//! The dataflow's promises, checked with the in-memory reader, writers and committer: no
//! broker, no database, no wall-clock assertions. Each test drives the worker loop turn by
//! turn and decides when each write becomes durable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use timely::worker::Worker;

use crate::durable_sink::SinkShape;
use crate::fakes::{FakeCommitter, FakeDatabase, FakeReader, FakeTopic};
use crate::ingest::{Ingest, IngestSettings};

fn settings(epoch_records: usize, max_epochs_in_flight: u64, connections: usize) -> IngestSettings {
    IngestSettings {
        epoch_records,
        epoch_bytes: usize::MAX,
        epoch_interval: Duration::ZERO,
        max_epochs_in_flight,
        max_bytes_in_flight: usize::MAX,
        sink: SinkShape { batch_size: 7, connections },
        commit_interval: Duration::ZERO,
        exit_when_idle: None,
    }
}

type Worker1 = Ingest<FakeReader, FakeCommitter, ()>;

fn start(worker: &mut Worker, s: IngestSettings, topic: &FakeTopic, db: &FakeDatabase, partitions: &[i32]) -> Worker1 {
    let writers = db.clone();
    Ingest::new(worker, s, topic.reader(partitions, db), db.committer(), move |c, d| writers.writer(c, d), ())
}

fn turns(ingest: &mut Worker1, worker: &mut Worker, n: usize) {
    for _ in 0..n {
        ingest.turn(worker).expect("the fake reader never stops the worker");
    }
}

/// Turns until `done` holds, at most `limit` times; says whether it held.
fn turn_until(ingest: &mut Worker1, worker: &mut Worker, limit: usize, done: impl Fn() -> bool) -> bool {
    for _ in 0..limit {
        if done() {
            return true;
        }
        ingest.turn(worker).expect("the fake reader never stops the worker");
    }
    done()
}

fn next_offset(ingest: &Worker1, partition: i32) -> i64 {
    use crate::source::PartitionReader;
    ingest.reader().next_offsets().iter().find(|(p, _)| *p == partition).map_or(0, |(_, o)| *o)
}

/// Removes every dataflow of the worker (as a crash would), so the next life starts afresh.
fn crash(worker: &mut Worker) {
    for id in worker.installed_dataflows() {
        worker.drop_dataflow(id);
    }
}

#[test]
fn offsets_are_committed_only_when_every_earlier_epoch_is_durable() {
    let (topic, db) = (FakeTopic::new(1), FakeDatabase::manual());
    topic.produce(0, 30);
    let (t, d) = (topic.clone(), db.clone());
    timely::execute_directly(move |worker| {
        let mut ingest = start(worker, settings(10, 10, 1), &t, &d, &[0]);
        assert!(turn_until(&mut ingest, worker, 100, || d.pending().len() == 3), "pending: {:?}", d.pending());
        // The writers finish the last epochs first: nothing may be committed.
        d.complete(2);
        d.complete(1);
        turns(&mut ingest, worker, 20);
        assert!(d.committed().is_empty(), "committed {:?} before epoch 0 was durable", d.committed());
        d.complete(0);
        assert!(turn_until(&mut ingest, worker, 100, || d.committed().get(&0) == Some(&30)));
        assert_eq!(d.violations(), Vec::<String>::new());
        drop(ingest);
        crash(worker);
    });
    assert_eq!(db.durable_offsets(0), (0..30).collect::<Vec<_>>());
}

#[test]
fn an_epoch_is_durable_only_when_every_writer_of_every_worker_reported_it() {
    let (topic, db) = (FakeTopic::new(1), FakeDatabase::manual());
    topic.produce(0, 40);
    let (t, d) = (topic.clone(), db.clone());
    timely::execute_directly(move |worker| {
        // One epoch of 40 records, split between two connections by key group.
        let mut ingest = start(worker, settings(40, 10, 2), &t, &d, &[0]);
        assert!(turn_until(&mut ingest, worker, 100, || d.pending().len() == 2), "pending: {:?}", d.pending());
        d.complete(1);
        turns(&mut ingest, worker, 20);
        assert!(d.committed().is_empty(), "committed {:?} with one writer still writing", d.committed());
        d.complete(0);
        assert!(turn_until(&mut ingest, worker, 100, || d.committed().get(&0) == Some(&40)));
        assert_eq!(d.violations(), Vec::<String>::new());
        drop(ingest);
        crash(worker);
    });
}

/// What the alert clock relies on (`AlertFeeder::tick`): a moment at which the worker had
/// read to the end counts only once everything read by then is durable, and under steady
/// traffic (an epoch always open) such moments still come.
#[test]
fn a_reading_counts_only_once_everything_read_by_then_is_durable() {
    use crate::source::PartitionReader;
    let (topic, db) = (FakeTopic::new(1), FakeDatabase::manual());
    topic.produce(0, 30);
    let (t, d) = (topic.clone(), db.clone());
    timely::execute_directly(move |worker| {
        let mut ingest = start(worker, settings(10, 10, 1), &t, &d, &[0]);
        let mut now = 0;
        let mut turn = |ingest: &mut Worker1, worker: &mut Worker| {
            now += 1;
            let reading = ingest.durable_reading(now);
            ingest.turn(worker).expect("the fake reader never stops the worker");
            (now, reading)
        };
        while d.pending().len() < 3 {
            turn(&mut ingest, worker);
        }
        let (read_at, _) = turn(&mut ingest, worker);
        assert!(ingest.reader().at_end());
        for _ in 0..20 {
            assert_eq!(turn(&mut ingest, worker).1, None, "three epochs are not durable yet");
        }
        d.complete(0);
        d.complete(0);
        for _ in 0..20 {
            assert_eq!(turn(&mut ingest, worker).1, None, "one epoch is not durable yet");
        }
        d.complete(0);
        let reading = (0..20).find_map(|_| turn(&mut ingest, worker).1).expect("everything read is durable");
        assert!(reading >= read_at, "a moment after the last record was read: {reading} < {read_at}");
        // Steady traffic: a record arrives every other turn, so the worker is at the end only
        // with the last record's epoch not yet durable, and the writer completes whatever is
        // pending. Readings keep coming, each no later than the turn it is reported in.
        let mut seen = Vec::new();
        for i in 0..100 {
            if i % 2 == 0 {
                t.produce(0, 1);
            }
            d.complete_all();
            let (at, reading) = turn(&mut ingest, worker);
            let reading = reading.expect("a reading once there was one");
            assert!(reading <= at);
            seen.push(reading);
        }
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "readings never go back: {seen:?}");
        assert!(seen.last() > seen.first(), "under steady traffic the readings move on: {seen:?}");
        assert_eq!(d.violations(), Vec::<String>::new());
        drop(ingest);
        crash(worker);
    });
}

#[test]
fn a_stuck_writer_stops_reading_at_the_in_flight_bound_and_commits_nothing() {
    let (topic, db) = (FakeTopic::new(1), FakeDatabase::manual());
    topic.produce(0, 1000);
    let (t, d) = (topic.clone(), db.clone());
    timely::execute_directly(move |worker| {
        let mut ingest = start(worker, settings(10, 3, 1), &t, &d, &[0]);
        turns(&mut ingest, worker, 200);
        // Three epochs of ten records may be in flight, not more.
        assert_eq!(next_offset(&ingest, 0), 30);
        assert_eq!(d.pending().len(), 3);
        assert!(d.committed().is_empty());
        // The writer comes back: everything is read, written and committed.
        assert!(turn_until(&mut ingest, worker, 5000, || {
            d.complete_all();
            d.committed().get(&0) == Some(&1000)
        }));
        assert_eq!(d.violations(), Vec::<String>::new());
        drop(ingest);
        crash(worker);
    });
    assert_eq!(db.durable_offsets(0), (0..1000).collect::<Vec<_>>());
}

#[test]
fn the_byte_bound_holds_whatever_the_epoch_count() {
    let (topic, db) = (FakeTopic::new(1), FakeDatabase::manual());
    topic.produce(0, 100);
    let (t, d) = (topic.clone(), db.clone());
    timely::execute_directly(move |worker| {
        // Fake records count 100 bytes each: at most three are read before the bound.
        let s = IngestSettings { max_bytes_in_flight: 250, ..settings(1, 1000, 1) };
        let mut ingest = start(worker, s, &t, &d, &[0]);
        turns(&mut ingest, worker, 200);
        assert_eq!(next_offset(&ingest, 0), 3);
        assert!(turn_until(&mut ingest, worker, 5000, || {
            d.complete_all();
            d.committed().get(&0) == Some(&100)
        }));
        drop(ingest);
        crash(worker);
    });
}

#[test]
fn an_idle_worker_never_holds_the_frontier_back() {
    let (topic, db) = (FakeTopic::new(2), FakeDatabase::completing());
    // Partition 1 (worker 1's) never gets a record.
    topic.produce(0, 500);
    let done = Arc::new(AtomicBool::new(false));
    let (t, d) = (topic.clone(), db.clone());
    let guards = timely::execute(timely::Config::process(2), move |worker| {
        let partition = worker.index() as i32;
        let mut ingest = start(worker, settings(50, 4, 1), &t, &d, &[partition]);
        let mut turn = 0;
        while !done.load(Ordering::SeqCst) {
            ingest.turn(worker).expect("the fake reader never stops the worker");
            turn += 1;
            if worker.index() == 0 && (d.committed().get(&0) == Some(&500) || turn > 4_000) {
                done.store(true, Ordering::SeqCst);
            }
        }
        drop(ingest);
        crash(worker);
    })
    .expect("timely starts");
    guards.join().into_iter().for_each(|r| r.expect("worker"));
    assert_eq!(db.committed().get(&0), Some(&500), "worker 0's offsets waited for idle worker 1");
    assert_eq!(db.violations(), Vec::<String>::new());
}

/// Epochs stand for moments, not for each worker's count of them: a worker that closed many
/// epochs (a burst) does not wait until a busy neighbour has closed as many.
#[test]
fn a_worker_that_closed_many_epochs_does_not_wait_for_another_to_close_as_many() {
    let (topic, db) = (FakeTopic::new(2), FakeDatabase::completing());
    topic.produce(0, 200);
    let burst_read = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let (t, d) = (topic.clone(), db.clone());
    let guards = timely::execute(timely::Config::process(2), move |worker| {
        let partition = worker.index() as i32;
        // One record per epoch, and no epoch moves by the clock alone during the test: only
        // closing epochs moves a worker's time.
        let s = IngestSettings { epoch_interval: Duration::from_secs(3600), ..settings(1, 1_000, 1) };
        let mut ingest = start(worker, s, &t, &d, &[partition]);
        let mut turn = 0;
        while !done.load(Ordering::SeqCst) {
            ingest.turn(worker).expect("the fake reader never stops the worker");
            turn += 1;
            if worker.index() == 0 && next_offset(&ingest, 0) == 200 && !burst_read.swap(true, Ordering::SeqCst) {
                // Worker 0 has closed 200 epochs; worker 1 now reads one record.
                t.produce(1, 1);
            }
            if worker.index() == 0 && (d.committed().get(&0) == Some(&200) || turn > 20_000) {
                done.store(true, Ordering::SeqCst);
            }
        }
        drop(ingest);
        crash(worker);
    })
    .expect("timely starts");
    guards.join().into_iter().for_each(|r| r.expect("worker"));
    assert_eq!(db.committed().get(&1), Some(&1), "worker 1 read and committed its record");
    assert_eq!(
        db.committed().get(&0),
        Some(&200),
        "worker 0's 200 epochs waited for worker 1, which closed {} epoch(s)",
        db.committed().get(&1).copied().unwrap_or(0)
    );
    assert_eq!(db.violations(), Vec::<String>::new());
}
#[test]
fn finishing_writes_the_open_epoch_and_commits_everything_read() {
    let (topic, db) = (FakeTopic::new(2), FakeDatabase::completing());
    topic.produce(0, 25);
    topic.produce(1, 7);
    let (t, d) = (topic.clone(), db.clone());
    let mirrored = timely::execute_directly(move |worker| {
        // Epochs of 1000 records: the 32 records stay in the open epoch until the finish.
        let s = IngestSettings { epoch_interval: Duration::from_secs(3600), ..settings(1000, 4, 1) };
        let mut ingest = start(worker, s, &t, &d, &[0, 1]);
        turns(&mut ingest, worker, 10);
        assert!(d.committed().is_empty());
        let (reader, ()) = ingest.finish(worker);
        reader.mirrored
    });
    assert_eq!(db.committed().into_iter().collect::<Vec<_>>(), vec![(0, 25), (1, 7)]);
    assert_eq!(mirrored.last(), Some(&vec![(0, 25), (1, 7)]), "the consumer group gets the last commit too");
    assert_eq!(db.rows().len(), 32);
}

/// One step of a random schedule.
#[derive(Clone, Debug)]
enum Step {
    Produce {
        partition: i32,
        records: i64,
    },
    Turn(usize),
    /// Completes the pending write at this index (modulo the number pending).
    Complete(usize),
    /// The process dies: writes not durable are lost; the worker restarts from the
    /// committed offsets.
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..2i32, 1..40i64).prop_map(|(partition, records)| Step::Produce { partition, records }),
        4 => (1..6usize).prop_map(Step::Turn),
        4 => (0..8usize).prop_map(Step::Complete),
        1 => Just(Step::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever the order of reads, completions and crashes: no commit ever releases an
    /// offset that is not durable, and in the end every record is durable exactly once
    /// (the fake's watermarks drop what a restart reads again).
    #[test]
    fn random_schedules_commit_only_durable_offsets_and_lose_nothing(
        schedule in proptest::collection::vec(step(), 1..60),
        epoch_records in 1..20usize,
        max_epochs in 1..5u64,
        connections in 1..3usize,
    ) {
        let (topic, db) = (FakeTopic::new(2), FakeDatabase::manual());
        let (t, d) = (topic.clone(), db.clone());
        let finished = timely::execute_directly(move |worker| {
            let s = settings(epoch_records, max_epochs, connections);
            let mut ingest = start(worker, s.clone(), &t, &d, &[0, 1]);
            for step in schedule {
                match step {
                    Step::Produce { partition, records } => t.produce(partition, records),
                    Step::Turn(n) => turns(&mut ingest, worker, n),
                    Step::Complete(i) => {
                        let pending = d.pending().len();
                        if pending > 0 {
                            d.complete(i % pending);
                        }
                    }
                    Step::Crash => {
                        d.lose_pending();
                        drop(ingest);
                        crash(worker);
                        ingest = start(worker, s.clone(), &t, &d, &[0, 1]);
                    }
                }
            }
            // The writers come back for good: everything produced gets committed.
            let ends = [t.end(0), t.end(1)];
            let all = turn_until(&mut ingest, worker, 20_000, || {
                d.complete_all();
                let c = d.committed();
                (0..2).all(|p| c.get(&p).copied().unwrap_or(0) == ends[p as usize])
            });
            drop(ingest);
            crash(worker);
            all
        });
        prop_assert!(finished, "not everything was committed: {:?}", db.committed());
        prop_assert_eq!(db.violations(), Vec::<String>::new());
        for p in 0..2 {
            prop_assert_eq!(db.durable_offsets(p), (0..topic.end(p)).collect::<Vec<_>>());
        }
    }
}
