//! The job rides out a database restart and a broker outage: it waits, says so, retries with
//! backoff and resumes, losing and duplicating nothing. While the database is away it stops
//! reading from Kafka once its bounded in-flight window is full (promise 4).

mod common;

use std::time::Duration;

use common::{assert_exactly_once, test_dir, Broker, Database, Job, PrivateServer, Stack};

#[test]
fn database_restart_waits_with_bounded_memory_and_resumes_exactly_once() {
    let dir = test_dir("db_restart");
    let server = PrivateServer::start(&dir);
    let stack = Stack::with(dir.clone(), Broker::start(&dir), Database::create_on(&server.url, "db_restart"), 2);
    let total = 120_000u64;
    let producer = stack.produce_in_background(total, 500, 5, 12_000.0);

    // 2 source workers x 4 epochs x 100 records may be in flight, no more.
    let (epoch_records, in_flight, workers) = (100u64, 4u64, 2u64);
    let bound = workers * in_flight * epoch_records;
    let flags = ["--epoch-records", "100", "--max-epochs-in-flight", "4", "--report-interval", "500ms"];
    let mut job = Job::start(&stack, "job", 1, workers as usize, &flags);
    stack.wait_for_rows(20_000, Duration::from_secs(120), &mut job);

    server.stop();
    std::thread::sleep(Duration::from_secs(8));
    // The summary the job rewrites at every report (500 ms here).
    let summary = job.summary(0);
    assert!(!summary.finished, "{summary:?}");
    assert!(summary.waiting_for_database, "the summary does not say it waits: {summary:?}");
    let (read, written) = (summary.records_read, summary.rows_written);
    println!("database down 8 s: {read} read, {written} written, {} in flight (bound {bound})", read - written);
    assert!(
        read - written <= bound,
        "{} records read but not written while the database was down; the bound is {bound}",
        read - written
    );
    assert!(read < 20_000 + 8 * 12_000 / 2, "the job kept reading while the database was down: {read}");
    let log = job.log_text();
    assert!(log.contains("database unavailable; waiting to write"), "no waiting message:\n{}", job.log_tail());
    assert!(log.contains("waiting for the database"), "the progress line does not say it waits:\n{}", job.log_tail());

    server.start_again();
    producer.join().unwrap();
    stack.wait_for_rows(total as i64, Duration::from_secs(240), &mut job);
    job.signal("TERM");
    let statuses = job.wait(Duration::from_secs(60));
    assert!(statuses.iter().all(|s| s.success()), "{statuses:?}\n{}", job.log_tail());
    assert!(job.log_text().contains("database is back"), "{}", job.log_tail());
    assert_exactly_once(&stack, total as i64, 2);
}

#[test]
fn broker_outage_waits_and_resumes_exactly_once() {
    let dir = test_dir("broker_outage");
    let mut stack = Stack::with(dir.clone(), Broker::start_durable(&dir), Database::create("broker_outage"), 2);
    let total = 20_000u64;
    stack.produce(total / 2, 200, 9, 0.0);

    let mut job = Job::start(&stack, "job", 1, 2, &["--epoch-records", "200"]);
    stack.wait_for_rows(2_000, Duration::from_secs(120), &mut job);
    stack.broker.stop();
    std::thread::sleep(Duration::from_secs(5));
    stack.broker.restart();
    // More records after the outage, through the restarted broker.
    stack.produce(total / 2, 200, 10, 0.0);
    stack.wait_for_rows(total as i64, Duration::from_secs(240), &mut job);
    job.signal("TERM");
    let statuses = job.wait(Duration::from_secs(60));
    assert!(statuses.iter().all(|s| s.success()), "{statuses:?}\n{}", job.log_tail());
    assert_exactly_once(&stack, total as i64, 2);
}
