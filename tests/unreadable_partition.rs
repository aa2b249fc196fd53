//! A partition that cannot be read is never a silent stall: it is counted, shown in /healthz
//! (503 with the reason), and after `--stall-timeout` the job stops with one line naming the
//! partition, how long, and the last Kafka error.
//!
//! The broker here is librdkafka's mock cluster (in this test process, reachable by the job
//! over TCP): it answers metadata and offset queries, so the job knows messages wait, while
//! every fetch fails with an authorization error, as a broker does once an ACL is removed.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{free_port, test_dir, Database, Job};
use fleetflow::cli::{KafkaArgs, LoadgenArgs};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const RECORDS: u64 = 1_000;

#[test]
fn a_partition_that_cannot_be_read_is_reported_then_stops_the_job_with_its_cause() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("metrics", 2, 1).unwrap();
    let kafka = KafkaArgs { brokers: mock.bootstrap_servers(), topic: "metrics".into(), kafka_options: vec![] };
    let args = LoadgenArgs::straight_to_kafka(kafka.clone(), 50, RECORDS, 1);
    let report = fleetflow::loadgen::produce(&args, &AtomicBool::new(false)).unwrap();
    assert_eq!(report.delivered, RECORDS);
    // From now on every fetch fails (each error answers one request; this lasts minutes).
    mock.request_errors(RDKafkaApiKey::Fetch, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 5_000]);

    let dir = test_dir("unreadable_partition");
    let db = Database::create("unreadable_partition");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fleetflow"));
    let log = dir.join("job.log");
    let summary = dir.join("job.summary.json");
    let file = std::fs::File::create(&log).unwrap();
    cmd.args(["run", "--brokers", &kafka.brokers, "--topic", "metrics", "--database-url", &db.url])
        .args(["--stall-timeout", "8s", "--report-interval", "500ms", "--exit-when-idle", "2s"])
        .args(["--metrics-listen", &metrics])
        .arg("--summary-json")
        .arg(&summary)
        .env("FLEETFLOW_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    let mut job = Job { children: vec![cmd.spawn().unwrap()], logs: vec![log], summaries: vec![summary] };

    // Stalled: /healthz says 503 and why, and the counter has the partition.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (health, scraped) = loop {
        let health = get(&metrics, "/healthz").unwrap_or_default();
        if health.lines().next().is_some_and(|l| l.contains(" 503 ")) && health.contains("\"partition\":0") {
            break (health, get(&metrics, "/metrics").unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "no stall in /healthz:\n{health}\n{}", job.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(health.contains("messages wait to be read"), "{health}");
    assert!(scraped.contains("fleetflow_partition_stalls_total{partition=\"0\"} 1"), "{scraped}");
    assert!(scraped.contains("fleetflow_partition_stalled{partition=\"0\"} 1"), "{scraped}");

    // Then the job stops by itself, non-zero, with one line naming partition, time and cause.
    let statuses = job.wait(Duration::from_secs(60));
    assert!(!statuses[0].success(), "{statuses:?}\n{}", job.log_tail());
    let text = job.log_text().replace('\u{1b}', "");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("fleetflow: ")).collect();
    assert_eq!(lines.len(), 1, "one line:\n{}", job.log_tail());
    let line = lines[0];
    assert!(line.contains("of topic \"metrics\" cannot be read: no message for "), "{line}");
    assert!(line.contains("messages wait to be read"), "{line}");
    assert!(line.contains("TopicAuthorizationFailed") || line.contains("authorization"), "{line}");
    assert!(line.contains("--stall-timeout 8s"), "{line}");
    // The summary's last write, on the way out, has the same exit code.
    let summary = job.summary(0);
    assert!(summary.finished && summary.exit_code == statuses[0].code(), "{summary:?} {statuses:?}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM fleetflow_partition_events WHERE kind = 'stalled'"),
        2,
        "both partitions"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM fleetflow_partition_events WHERE kind = 'stopped'"), 1);
}

/// GET `path` of the job's HTTP endpoint: status line, headers and body.
fn get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}
