//! Operators make mistakes and the job catches them (promise 7): a topic deleted and
//! recreated under the same name is detected while the job runs and at every later start,
//! and nothing of it is written until the operator says `--on-topic-reset start-over`; then
//! every new message lands exactly once. Messages retention deleted before the job read them
//! are a counted, reported gap, not a silent one.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{Job, Stack};
use fleetflow::cli::LoadgenArgs;

const PARTITIONS: i32 = 4;

fn admin(stack: &Stack) -> rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> {
    rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.broker.addr).create().unwrap()
}

fn options() -> rdkafka::admin::AdminOptions {
    rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

/// Deletes the topic (Kafka's DeleteTopics) and creates it again, empty.
fn recreate_topic(stack: &Stack) {
    let results = common::runtime().block_on(admin(stack).delete_topics(&[&stack.topic], &options())).unwrap();
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("the broker cannot delete {topic}: {code:?}"));
    }
    let kafka: fleetflow::config::KafkaConfig = stack.broker.kafka(&stack.topic).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleetflow::kafka::admin::partition_count(&kafka).is_ok() {
        assert!(Instant::now() < deadline, "the topic is still there after DeleteTopics");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(fleetflow::kafka::admin::create_topic(&kafka, PARTITIONS, 1)).unwrap();
    assert!(stack.end_offsets(PARTITIONS).iter().all(|(_, end)| *end == 0), "the recreated topic is not empty");
}

/// Produces `count` records stamped from `hours_ago` on (each batch its own (serverId, time)s).
fn produce_at(stack: &Stack, count: u64, seed: u64, hours_ago: i64) {
    let start = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() - 3600 * hours_ago, 0).unwrap();
    let args = LoadgenArgs { start_time: Some(start.to_rfc3339()), ..stack.loadgen_args(count, 100, seed) };
    let report = fleetflow::loadgen::produce(&args, &AtomicBool::new(false)).unwrap();
    assert_eq!((report.delivered, report.failed), (count, 0), "not every record was acknowledged");
}

/// The line a failed job printed on stderr ("fleetflow: worker N: ..."). Every worker of a
/// process may print the same one (job.rs), so identical lines count once.
fn fatal_line(job: &Job) -> String {
    let text = job.log_text().replace('\u{1b}', "");
    let mut lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("fleetflow: "))
        .map(|l| l.strip_prefix("worker ").and_then(|w| w.split_once(": ")).map_or(l, |(_, rest)| rest))
        .collect();
    lines.dedup();
    lines.join("\n")
}

fn run_to_failure(stack: &Stack, label: &str, flags: &[&str]) -> String {
    let mut job = Job::start(stack, label, 1, 2, flags);
    let statuses = job.wait(Duration::from_secs(60));
    assert!(statuses.iter().all(|s| !s.success()), "{label}: the job must refuse: {statuses:?}\n{}", job.log_tail());
    let line = fatal_line(&job);
    assert_eq!(line.lines().count(), 1, "{label}: one line, got:\n{line}\n{}", job.log_tail());
    line
}

#[test]
fn a_recreated_topic_is_refused_until_started_over_then_read_exactly_once() {
    let stack = Stack::start("topic_reset", PARTITIONS);
    produce_at(&stack, 8_000, 1, 6);
    let mut job = Job::start(&stack, "first", 1, 2, &["--epoch-records", "500"]);
    stack.wait_for_rows(8_000, Duration::from_secs(120), &mut job);
    // Everything committed: the offsets are the old topic's ends.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.db.scalar("SELECT coalesce(sum(next_offset), 0)::bigint FROM fleetflow_offsets") < 8_000 {
        assert!(Instant::now() < deadline, "offsets not committed\n{}", job.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }

    let old_committed = stack.db.pairs("SELECT partition, next_offset FROM fleetflow_offsets ORDER BY partition");

    // Under the running job: deleted, recreated, and fewer messages than before.
    recreate_topic(&stack);
    produce_at(&stack, 1_000, 2, 5);
    let statuses = job.wait(Duration::from_secs(90));
    assert!(statuses.iter().all(|s| !s.success()), "the running job must stop: {statuses:?}\n{}", job.log_tail());
    let line = fatal_line(&job);
    assert!(line.contains("was deleted and recreated, or truncated, while the job ran"), "{line}\n{}", job.log_tail());
    assert!(line.contains("--on-topic-reset start-over"), "{line}");
    assert_eq!(stack.db.metric_rows(), 8_000, "nothing of the new topic was written\n{}", job.log_tail());

    // A restart refuses: the committed offsets lie beyond the new partitions' ends.
    let line = run_to_failure(&stack, "restart", &["--exit-when-idle", "2s"]);
    assert!(line.contains("do not fit it"), "{line}");
    assert!(line.contains("partition 0 ends at offset"), "{line}");
    assert!(line.contains("--on-topic-reset start-over"), "{line}");

    // Still refused once the new topic has grown past the old offsets (offsets alone would
    // fit again): the messages under the last commits are not there any more (landmarks),
    // and the reset found earlier stands until the operator starts over.
    produce_at(&stack, 8_000, 3, 4);
    let new_ends = stack.end_offsets(PARTITIONS);
    assert!(
        old_committed.iter().zip(&new_ends).all(|((_, old), (_, new))| new > old),
        "{old_committed:?} {new_ends:?}"
    );
    let line = run_to_failure(&stack, "grown", &["--exit-when-idle", "2s"]);
    assert!(line.contains("do not fit it"), "{line}");
    assert!(line.contains("found earlier") || line.contains("another one is there now"), "{line}");
    assert_eq!(stack.db.metric_rows(), 8_000, "nothing of the new topic was written");

    // The operator's decision: every message of the new topic lands, exactly once.
    let mut over = Job::start(&stack, "over", 1, 2, &["--on-topic-reset", "start-over", "--exit-when-idle", "2s"]);
    over.wait_success(Duration::from_secs(120));
    assert!(over.log_text().contains("--on-topic-reset start-over"), "{}", over.log_tail());
    let db = &stack.db;
    assert_eq!(db.metric_rows(), 8_000 + 9_000, "old rows stay, every new message lands");
    assert_eq!(db.scalar("SELECT count(*) FROM (SELECT DISTINCT server_id, time FROM metrics) d"), 17_000);
    let new_rows = "metrics WHERE time >= now() - interval '5 hours 30 minutes'";
    assert_eq!(db.scalar(&format!("SELECT count(*) FROM {new_rows}")), 9_000);
    assert_eq!(
        db.scalar(&format!("SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM {new_rows}) d")),
        9_000,
        "no new message written twice"
    );
    let committed = db.pairs("SELECT partition, next_offset FROM fleetflow_offsets ORDER BY partition");
    assert_eq!(committed, stack.end_offsets(PARTITIONS), "committed offsets are the new topic's ends");

    // And the next start is an ordinary one.
    let mut again = Job::start(&stack, "again", 1, 2, &["--exit-when-idle", "2s"]);
    again.wait_success(Duration::from_secs(60));
    assert_eq!(db.metric_rows(), 17_000);
}

#[test]
fn a_topic_recreated_while_the_job_was_stopped_is_refused_even_once_it_grew_past_the_old_offsets() {
    let stack = Stack::start("topic_recreated_stopped", PARTITIONS);
    produce_at(&stack, 4_000, 1, 6);
    let mut job = Job::start(&stack, "first", 1, 2, &["--exit-when-idle", "2s"]);
    job.wait_success(Duration::from_secs(120));
    let old = stack.end_offsets(PARTITIONS);
    assert_eq!(stack.db.pairs("SELECT partition, next_offset FROM fleetflow_offsets ORDER BY partition"), old);

    // While the job is stopped: deleted, recreated, and grown past the old offsets, so the
    // committed offsets fit the new topic; only the messages under them tell it apart.
    recreate_topic(&stack);
    produce_at(&stack, 8_000, 2, 5);
    let new = stack.end_offsets(PARTITIONS);
    assert!(old.iter().zip(&new).all(|((_, o), (_, n))| n > o), "{old:?} {new:?}");
    let line = run_to_failure(&stack, "restart", &["--exit-when-idle", "2s"]);
    assert!(line.contains("do not fit it"), "{line}");
    assert!(line.contains("was produced at") && line.contains("another one is there now"), "{line}");
    assert!(line.contains("--on-topic-reset start-over"), "{line}");
    assert_eq!(stack.db.metric_rows(), 4_000, "nothing of the new topic was written, nothing skipped silently");

    // Started over: every message of the new topic lands once; then an ordinary restart.
    let mut over = Job::start(&stack, "over", 1, 2, &["--on-topic-reset", "start-over", "--exit-when-idle", "2s"]);
    over.wait_success(Duration::from_secs(120));
    assert_eq!(stack.db.metric_rows(), 12_000);
    produce_at(&stack, 1_000, 3, 4);
    let mut again = Job::start(&stack, "again", 1, 2, &["--exit-when-idle", "2s"]);
    again.wait_success(Duration::from_secs(120));
    assert_eq!(stack.db.metric_rows(), 13_000, "the same topic is recognised and read on");
}

#[test]
fn messages_retention_deleted_before_they_were_read_are_a_counted_gap() {
    let stack = Stack::start("retention_gap", PARTITIONS);
    produce_at(&stack, 4_000, 1, 6);
    let mut job = Job::start(&stack, "first", 1, 2, &["--exit-when-idle", "2s"]);
    job.wait_success(Duration::from_secs(120));
    let before = stack.end_offsets(PARTITIONS);

    // While the job is stopped: more messages, and "retention" (DeleteRecords) removes the
    // first 300 of them from partition 1 before anyone read them.
    produce_at(&stack, 4_000, 2, 5);
    let (partition, committed) = before[1];
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(&stack.topic, partition, rdkafka::Offset::Offset(committed + 300)).unwrap();
    let result = common::runtime().block_on(admin(&stack).delete_records(&list, &options())).unwrap();
    assert_eq!(result.elements()[0].error(), Ok(()), "DeleteRecords");
    let (_, low, _) =
        fleetflow::kafka::admin::watermarks(&stack.broker.kafka(&stack.topic).into(), &[partition]).unwrap()[0];
    assert_eq!(low, committed + 300, "the broker moved the log start");

    let metrics = format!("127.0.0.1:{}", common::free_port());
    let mut job = Job::start(&stack, "second", 1, 2, &["--exit-when-idle", "4s", "--metrics-listen", &metrics]);
    // The gap is counted per partition in Prometheus while the job runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    let scraped = loop {
        let body = scrape(&metrics).unwrap_or_default();
        if body.contains("fleetflow_skipped_offsets_total{partition=\"1\"} 300") {
            break body;
        }
        assert!(Instant::now() < deadline, "no skipped_offsets metric:\n{body}\n{}", job.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(scraped.contains("fleetflow_skipped_offsets_total"), "{scraped}");
    job.wait_success(Duration::from_secs(120));
    let log = job.log_text();
    assert!(
        log.contains("retention deleted 300 messages of partition 1 before the job read them"),
        "{}",
        job.log_tail()
    );

    common::assert_exactly_once(&stack, 8_000 - 300, PARTITIONS);
    // `status` shows the gap after the fact.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetflow"))
        .args(["status", "--brokers", &stack.broker.addr, "--topic", &stack.topic, "--database-url", &stack.db.url])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("skipped offsets"), "{status}");
    assert_eq!(
        stack.db.scalar(
            "SELECT sum(to_offset - from_offset)::bigint FROM fleetflow_partition_events WHERE kind = 'skipped'"
        ),
        300
    );
}

/// GET /metrics of a job.
fn scrape(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}
