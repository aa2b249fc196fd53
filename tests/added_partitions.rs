//! Partitions added to the topic are read without a restart, by the worker that owns them in
//! every process's view (p mod N), from their earliest offset: `--start latest` applies to the
//! job's very first run only, never to partitions that appear later, whether the job is
//! running then or not.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{assert_exactly_once, Job, Stack};
use fleetflow::cli::LoadgenArgs;

/// Grows the topic to `partitions` partitions: Kafka's CreatePartitions where the broker has
/// it. nisshi 0.8.1 does not ("UnsupportedFeature"); its sqlite storage is then grown the way
/// its own CreateTopics lays a topic out (a `topition` and a `watermark` row per partition),
/// which the running broker serves at once: metadata, produce and fetch.
fn add_partitions(stack: &Stack, partitions: usize) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.broker.addr).create().unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match common::runtime().block_on(admin.create_partitions(&[NewPartitions::new(&stack.topic, partitions)], &options))
    {
        Ok(results) => {
            for result in results {
                result.unwrap_or_else(|(topic, code)| panic!("the broker cannot add partitions to {topic}: {code:?}"));
            }
        }
        Err(rdkafka::error::KafkaError::AdminOp(rdkafka::types::RDKafkaErrorCode::UnsupportedFeature)) => {
            let current = fleetflow::kafka::admin::partition_count(&stack.broker.kafka(&stack.topic).into()).unwrap();
            let mut sql = format!("UPDATE topic SET partitions = {partitions} WHERE name = '{}';", stack.topic);
            for p in current..partitions as i32 {
                sql += &format!(
                    "INSERT INTO topition (topic, partition) SELECT id, {p} FROM topic WHERE name = '{0}';
                     INSERT INTO watermark (topition) SELECT tp.id FROM topition tp JOIN topic t ON tp.topic = t.id
                       WHERE t.name = '{0}' AND tp.partition = {p};",
                    stack.topic
                );
            }
            let out = std::process::Command::new("sqlite3")
                .arg(stack.dir.join("broker.db"))
                .arg(&sql)
                .output()
                .expect("sqlite3 (Debian package sqlite3) grows the broker's topic");
            assert!(out.status.success(), "sqlite3: {}", String::from_utf8_lossy(&out.stderr));
        }
        Err(e) => panic!("CreatePartitions request: {e}"),
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleetflow::kafka::admin::partition_count(&stack.broker.kafka(&stack.topic).into()).unwrap()
        != partitions as i32
    {
        assert!(Instant::now() < deadline, "the topic does not show {partitions} partitions");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Produces `count` records from a given start time (distinct (serverId, time) per batch).
fn produce_at(stack: &Stack, count: u64, seed: u64, hours_ago: i64) {
    let start = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() - 3600 * hours_ago, 0).unwrap();
    let args = LoadgenArgs { start_time: Some(start.to_rfc3339()), ..stack.loadgen_args(count, 100, seed) };
    let report = fleetflow::loadgen::produce(&args, &AtomicBool::new(false)).unwrap();
    assert_eq!((report.delivered, report.failed), (count, 0), "not every record was acknowledged");
}

fn wait_until(what: &str, timeout: Duration, job: &Job, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}\n{}", job.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn partitions_added_while_running_or_stopped_are_read_from_earliest_exactly_once() {
    // A durable (sqlite) broker: see add_partitions.
    let dir = common::test_dir("added_partitions");
    let broker = common::Broker::start_durable(&dir);
    let stack = Stack::with(dir, broker, common::Database::create("added_partitions"), 2);
    // Before the job's first start: --start latest skips these.
    produce_at(&stack, 2_000, 1, 5);

    let flags = ["--start", "latest", "--metadata-interval", "1s", "--stall-timeout", "30s"];
    let mut job = Job::start(&stack, "first", 2, 1, &flags);
    // The first run pinned its start at the end of partitions 0 and 1.
    wait_until("the job pins its start offsets", Duration::from_secs(60), &job, || {
        stack.db.scalar("SELECT (to_regclass('fleetflow_offsets') IS NOT NULL)::int::bigint") == 1
            && stack.db.scalar("SELECT count(*) FROM fleetflow_offsets") == 2
    });

    // While it runs: two more partitions, then records into all four.
    add_partitions(&stack, 4);
    produce_at(&stack, 4_000, 2, 4);
    let new_in_running = stack.end_offsets(4)[2..].iter().map(|(_, end)| end).sum::<i64>();
    assert!(new_in_running > 0, "no record went to the new partitions");
    stack.wait_for_rows(4_000, Duration::from_secs(120), &mut job);
    let status = status(&stack);
    assert!(status.lines().any(|l| l.trim_start().starts_with("3 ")), "status shows partition 3:\n{status}");
    job.signal("TERM");
    let statuses = job.wait(Duration::from_secs(60));
    assert!(statuses.iter().all(|s| s.success()), "{statuses:?}\n{}", job.log_tail());
    assert!(job.log_text().contains("partition added to the topic"), "{}", job.log_tail());
    assert_exactly_once(&stack, 4_000, 4);

    // While it is stopped: two more, and records into all six. A restart with --start latest
    // still reads the new partitions from their earliest offset: it is not the first run.
    add_partitions(&stack, 6);
    produce_at(&stack, 3_000, 3, 3);
    let mut second = Job::start(&stack, "second", 2, 1, &["--start", "latest", "--exit-when-idle", "2s"]);
    second.wait_success(Duration::from_secs(120));
    assert_exactly_once(&stack, 7_000, 6);
    assert_eq!(
        stack.db.scalar("SELECT count(*) FROM fleetflow_partition_events WHERE kind = 'added'"),
        2,
        "partitions 2 and 3 were added while the job ran"
    );
}

/// `fleetflow status` against the stack.
fn status(stack: &Stack) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetflow"))
        .args(["status", "--brokers", &stack.broker.addr, "--topic", &stack.topic])
        .args(["--database-url", &stack.db.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
