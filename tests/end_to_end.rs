//! The main path, end to end against a real broker and a real TimescaleDB: 100,000 records
//! through a 2-process x 2-worker job land exactly once, offsets are committed to the end,
//! and every serverId was written by a single worker.

mod common;

use std::time::Duration;

use common::{assert_exactly_once, Job, Stack};

const RECORDS: u64 = 100_000;
const SERVERS: u32 = 1_000;

#[test]
fn two_by_two_job_writes_every_record_exactly_once() {
    let stack = Stack::start("end_to_end", 4);
    stack.produce(RECORDS, SERVERS, 42, 0.0);

    let mut job = Job::start(&stack, "run", 2, 2, &["--exit-when-idle", "2s", "--audit"]);
    job.wait_success(Duration::from_secs(300));

    assert_exactly_once(&stack, RECORDS as i64, 4);
    let db = &stack.db;
    // Promise 2: one worker per serverId (the audit table names the writer of each batch).
    assert_eq!(db.scalar("SELECT count(DISTINCT server_id) FROM fleetflow_audit"), SERVERS as i64);
    assert_eq!(db.scalar("SELECT sum(rows)::bigint FROM fleetflow_audit"), RECORDS as i64);
    assert_eq!(
        db.scalar("SELECT count(*) FROM (SELECT server_id FROM fleetflow_audit GROUP BY server_id HAVING count(DISTINCT worker) > 1) s"),
        0,
        "some serverId was written by more than one worker"
    );
    assert_eq!(db.scalar("SELECT count(DISTINCT worker)::bigint FROM fleetflow_audit"), 4, "all four workers wrote");
    assert_eq!(db.scalar("SELECT count(*) FROM fleetflow_dead_letters"), 0);

    // The consumer group mirrors the committed offsets, for ops' lag tools.
    let group = committed_group_offsets(&stack, 4);
    assert_eq!(group, stack.end_offsets(4), "consumer group offsets");
}

fn committed_group_offsets(stack: &Stack, partitions: i32) -> Vec<(i32, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.broker.addr)
        .set("group.id", "fleetflow")
        .create()
        .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(&stack.topic, p);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
    committed.elements().iter().map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1))).collect()
}
