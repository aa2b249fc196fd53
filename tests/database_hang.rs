//! A database that stops answering is noticed: a write that hangs past `--database-timeout`
//! is abandoned, /healthz says the database is not answering, and the write is retried on a
//! new connection once the hung session is gone, without loss or duplicates.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_exactly_once, free_port, Job, Stack};

fn healthz(listen: &str) -> String {
    common::runtime().block_on(async {
        match reqwest::get(format!("http://{listen}/healthz")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    })
}

fn signal(pids: &[i32], name: &str) {
    for pid in pids {
        let _ = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
    }
}

#[test]
fn a_hung_database_session_is_detected_replaced_and_nothing_is_lost_or_doubled() {
    let stack = Stack::start("db_hang", 2);
    let producer = stack.produce_in_background(30_000, 200, 8, 6_000.0);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut job = Job::start(
        &stack,
        "job",
        1,
        2,
        &["--database-timeout", "2s", "--metrics-listen", &listen, "--exit-when-idle", "3s"],
    );
    stack.wait_for_rows(1, Duration::from_secs(60), &mut job);

    // Freeze every session of the job mid-stream, as a hung server would be.
    let frozen = stack.job_sessions();
    assert!(!frozen.is_empty());
    signal(&frozen, "STOP");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let health = healthz(&listen);
        if health.contains("\"database_not_answering\":true") {
            break;
        }
        if Instant::now() > deadline {
            signal(&frozen, "CONT");
            panic!("/healthz never said the database is not answering: {health}\n{}", job.log_tail());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    signal(&frozen, "CONT");

    producer.join().unwrap();
    job.wait_success(Duration::from_secs(180));
    assert!(job.log_text().contains("the database is not answering"), "{}", job.log_tail());
    assert_exactly_once(&stack, 30_000, 2);
}
