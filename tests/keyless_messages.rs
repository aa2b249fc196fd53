//! Issue 10: keyless messages whose timestamp lies near the edge of the accepted window are
//! valid for one run and dead letters for the next (`--max-age`, `--max-future` and the wall
//! clock decide). Their key group must not follow that verdict: the watermarks that drop
//! replayed messages after a crash are per (key group, partition), so a message that changed
//! key group between the run that wrote it and the run that replays it would be written
//! twice, once as a row and once as a dead letter.
//!
//! Three runs over one topic, each with other limits, the first two SIGKILLed after writing
//! but before committing any offset (`--commit-interval 1h`), so every run replays the
//! whole topic: afterwards every message is exactly once a row or a dead letter, with the
//! verdict of the run that first wrote it.
//!
//! On the old routing (a dead letter without a key went to its partition's key group, a
//! valid record to its serverId's), the replay in the second run writes the edge messages at
//! the end of the first batch again (as rows) above the watermarks of their new key group:
//! the last message of each partition is such a message, so the test fails there for sure.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Job, Stack};
use rdkafka::producer::{BaseRecord, Producer};

const PARTITIONS: i32 = 2;
/// Limits under which the edge messages are dead letters (timestamp out of the window)...
const STRICT: [&str; 4] = ["--max-age", "1h", "--max-future", "10m"];
/// ... and under which they are valid.
const LENIENT: [&str; 4] = ["--max-age", "3h", "--max-future", "1h"];
/// No offset commit before the kill: the next run replays everything the killed one wrote.
const NO_COMMIT: [&str; 2] = ["--commit-interval", "1h"];

struct Message {
    key: Option<String>,
    value: String,
    /// The serverId a row of it would carry.
    server_id: String,
    valid_strict: bool,
    valid_lenient: bool,
    edge: bool,
}

/// Message number `n` (unique serverId `k{n}`) of kind `band`, `t0` the test's start.
fn message(n: usize, band: usize, t0: i64) -> Message {
    let id = format!("k{n}");
    let n_ms = n as i64;
    let record = |ts: i64| format!(r#"{{"serverId":"{id}","cpu":{},"ram":50,"ts":{ts}}}"#, n % 100);
    let (key, value, valid_strict, valid_lenient, edge) = match band {
        // Well inside every window.
        0 => (None, record(t0 - 600_000 + n_ms), true, true, false),
        // Two hours old: a dead letter under --max-age 1h, valid under 3h.
        1 => (None, record(t0 - 7_200_000 + n_ms), false, true, true),
        // Half an hour ahead: a dead letter under --max-future 10m, valid under 1h.
        2 => (None, record(t0 + 1_800_000 + n_ms), false, true, true),
        // The same with a key (its key group never depended on the verdict).
        3 => (Some(id.clone()), record(t0 - 7_200_000 + n_ms), false, true, true),
        // Never valid, but names its server.
        4 => (None, format!(r#"{{"serverId":"{id}","cpu":"high","ts":{t0}}}"#), false, false, false),
        // Never valid, names nothing.
        _ => (None, format!("garbage {n}"), false, false, false),
    };
    Message { key, value, server_id: id, valid_strict, valid_lenient, edge }
}

/// `count` messages numbered from `first`, the kinds in turn; with `edge_tail`, the last
/// message of each partition is a keyless edge message (two hours old).
fn batch(first: usize, count: usize, t0: i64, edge_tail: bool) -> Vec<Message> {
    let mut messages: Vec<Message> = (first..first + count).map(|n| message(n, n % 6, t0)).collect();
    if edge_tail {
        for n in first + count..first + count + PARTITIONS as usize {
            messages.push(message(n, 1, t0));
        }
    }
    messages
}

/// Produces the messages, message `i` of the topic to partition `i mod 2`.
fn produce(stack: &Stack, messages: &[Message], already: usize) {
    let deliveries = Arc::new(fleetflow::loadgen::Deliveries::default());
    let producer = fleetflow::kafka::producer::producer(
        &stack.broker.kafka(&stack.topic).into(),
        fleetflow::loadgen::ArcContext(deliveries.clone()),
    )
    .unwrap();
    for (i, m) in messages.iter().enumerate() {
        let partition = ((already + i) % PARTITIONS as usize) as i32;
        let mut record = BaseRecord::to(&stack.topic).payload(&m.value).partition(partition);
        if let Some(k) = &m.key {
            record = record.key(k);
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    assert_eq!(deliveries.delivered.load(Ordering::Relaxed), messages.len() as u64, "every message acknowledged");
}

/// Rows plus dead letters, or 0 before the job created the tables.
fn landed(stack: &Stack) -> i64 {
    common::runtime().block_on(async {
        let client = fleetflow::sink::connect(&stack.db.url).await.unwrap();
        let sql = "SELECT (SELECT count(*) FROM metrics) + (SELECT count(*) FROM fleetflow_dead_letters)";
        client.query_one(sql, &[]).await.map(|r| r.get::<_, i64>(0)).unwrap_or(0)
    })
}

/// Waits until `count` messages landed, then SIGKILLs the job.
fn kill_when_landed(stack: &Stack, job: &mut Job, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = job.children[0].try_wait().unwrap() {
            panic!("the job exited ({status}) before {count} messages landed\n{}", job.log_tail());
        }
        let n = landed(stack);
        assert!(n <= count as i64, "{n} messages landed, more than the {count} produced\n{}", job.log_tail());
        if n == count as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} of {count} messages landed\n{}", job.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    job.crash(0, Duration::ZERO);
}

#[test]
fn keyless_messages_around_the_time_window_land_exactly_once_across_crashes_and_limits() {
    let stack = Stack::start("keyless", PARTITIONS);
    let t0 = fleetflow::record::now_ms();
    let a = batch(0, 3_000, t0, true);
    let b = batch(a.len(), 3_000, t0, false);
    let c = batch(a.len() + b.len(), 1_000, t0, false);

    // Run 1, strict: the edge messages of batch A are dead letters. Killed once A is written.
    produce(&stack, &a, 0);
    let mut run1 = Job::start(&stack, "strict", 1, 2, &[&STRICT[..], &NO_COMMIT].concat());
    kill_when_landed(&stack, &mut run1, a.len());
    let committed = stack.db.scalar("SELECT count(*) FROM fleetflow_offsets WHERE next_offset > 0");
    assert_eq!(committed, 0, "an offset was committed: the next run would not replay batch A");

    // Run 2, lenient, another shape: replays A (where the edge messages are valid now) and
    // writes B, whose edge messages become rows. Killed once B is written.
    produce(&stack, &b, a.len());
    let mut run2 = Job::start(&stack, "lenient", 1, 1, &[&LENIENT[..], &NO_COMMIT].concat());
    kill_when_landed(&stack, &mut run2, a.len() + b.len());

    // Run 3, strict again: replays A and B (B's edge messages are dead letters now), writes C.
    produce(&stack, &c, a.len() + b.len());
    let mut run3 = Job::start(&stack, "strict-again", 1, 2, &[&STRICT[..], &["--exit-when-idle", "2s"]].concat());
    run3.wait_success(Duration::from_secs(120));

    // Every message is exactly once a row or a dead letter...
    let total = (a.len() + b.len() + c.len()) as i64;
    let db = &stack.db;
    let positions = "SELECT kafka_partition AS p, kafka_offset AS o FROM metrics \
                     UNION ALL SELECT partition, \"offset\" FROM fleetflow_dead_letters";
    assert_eq!(db.scalar(&format!("SELECT count(*) FROM ({positions}) u")), total, "rows + dead letters");
    assert_eq!(
        db.scalar(&format!("SELECT count(*) FROM (SELECT DISTINCT p, o FROM ({positions}) u) d")),
        total,
        "a message is both a row and a dead letter, or twice one of them"
    );
    let committed = db.pairs("SELECT partition, next_offset FROM fleetflow_offsets ORDER BY partition");
    assert_eq!(committed, stack.end_offsets(PARTITIONS), "committed offsets are the partitions' end offsets");

    // ... with the verdict of the run that first read it: A and C strict, B lenient.
    let verdict = |m: &Message, lenient: bool| if lenient { m.valid_lenient } else { m.valid_strict };
    let want_rows: BTreeSet<String> = [(&a, false), (&b, true), (&c, false)]
        .iter()
        .flat_map(|(batch, lenient)| batch.iter().filter(|m| verdict(m, *lenient)).map(|m| m.server_id.clone()))
        .collect();
    let got_rows: BTreeSet<String> = common::runtime().block_on(async {
        let client = fleetflow::sink::connect(&db.url).await.unwrap();
        let rows = client.query("SELECT server_id FROM metrics", &[]).await.unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    });
    let edge_rows = b.iter().filter(|m| m.edge).count();
    assert!(edge_rows > 0 && a.iter().chain(&c).any(|m| m.edge), "the test flips no message");
    assert_eq!(got_rows.len(), want_rows.len(), "rows");
    assert!(got_rows == want_rows, "the rows are not the messages valid in the run that first read them");
    let edge_dead = db.scalar("SELECT count(*) FROM fleetflow_dead_letters WHERE kind = 'timestamp_out_of_bounds'");
    assert_eq!(edge_dead as usize, a.iter().chain(&c).filter(|m| m.edge).count(), "edge dead letters");
}
