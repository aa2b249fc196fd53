//! Promise 7: two copies of the job never both write a topic. A second copy refuses to
//! start, naming the one that holds the topic; `--take-over` fences out a frozen copy, whose
//! later writes are refused. Exactly once holds in each case.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_exactly_once, Job, Stack};

/// Exit code of a job fenced out by another copy, as the README documents it.
const FENCED: i32 = 4;

#[test]
fn two_copies_started_together_write_once_and_one_of_them_refuses() {
    let stack = Stack::start("fence_together", 2);
    stack.produce(20_000, 100, 3, 0.0);
    let mut a = Job::start(&stack, "a", 1, 2, &["--exit-when-idle", "2s"]);
    let mut b = Job::start(&stack, "b", 1, 2, &["--exit-when-idle", "2s"]);
    let codes: Vec<Option<i32>> = a
        .wait(Duration::from_secs(120))
        .into_iter()
        .chain(b.wait(Duration::from_secs(120)))
        .map(|s| s.code())
        .collect();
    let refused = codes.iter().filter(|c| **c == Some(FENCED)).count();
    let succeeded = codes.iter().filter(|c| **c == Some(0)).count();
    assert_eq!((succeeded, refused), (1, 1), "exit codes {codes:?}\n{}\n{}", a.log_tail(), b.log_tail());
    let refusal = if codes[0] == Some(FENCED) { a.log_text() } else { b.log_text() };
    assert!(
        refusal.contains("is already being written into this database by another fleetflow job")
            && refusal.contains("pid"),
        "the refusal names the holder:\n{refusal}"
    );
    assert_exactly_once(&stack, 20_000, 2);

    // status names the holder, and that it is no longer running.
    let out = Command::new(env!("CARGO_BIN_EXE_fleetflow"))
        .args(["status", "--brokers", &stack.broker.addr, "--database-url", &stack.db.url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("held by: host ") && text.contains("not running now"), "{text}");
}

#[test]
fn a_copy_started_while_the_job_runs_is_refused_and_the_first_finishes_exactly_once() {
    let stack = Stack::start("fence_running", 2);
    let producer = stack.produce_in_background(30_000, 100, 4, 5_000.0);
    let mut a = Job::start(&stack, "a", 2, 1, &["--exit-when-idle", "3s"]);
    stack.wait_for_rows(1, Duration::from_secs(60), &mut a);
    let mut b = Job::start(&stack, "b", 1, 1, &["--exit-when-idle", "3s"]);
    let codes: Vec<Option<i32>> = b.wait(Duration::from_secs(60)).iter().map(|s| s.code()).collect();
    assert_eq!(codes, vec![Some(FENCED)], "{}", b.log_tail());
    producer.join().unwrap();
    a.wait_success(Duration::from_secs(120));
    assert_exactly_once(&stack, 30_000, 2);
}

#[test]
fn take_over_fences_out_a_frozen_copy_whose_later_writes_are_refused() {
    let stack = Stack::start("fence_take_over", 2);
    let producer = stack.produce_in_background(30_000, 100, 5, 5_000.0);
    let mut a = Job::start(&stack, "a", 1, 2, &[]);
    stack.wait_for_rows(1, Duration::from_secs(60), &mut a);
    // A zombie: frozen mid-stream, its database sessions (and maybe a transaction) open.
    signal(&a, "STOP");
    let mut b = Job::start(&stack, "b", 1, 2, &["--take-over", "--exit-when-idle", "3s"]);
    producer.join().unwrap();
    b.wait_success(Duration::from_secs(120));
    assert_exactly_once(&stack, 30_000, 2);

    // The zombie wakes up: it must stop on its own, writing nothing more.
    signal(&a, "CONT");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = a.children[0].try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the fenced-out job did not stop\n{}", a.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(FENCED), "{}", a.log_tail());
    assert!(a.log_text().contains("took over topic"), "{}", a.log_tail());
    assert_exactly_once(&stack, 30_000, 2);
}

fn signal(job: &Job, name: &str) {
    for child in &job.children {
        let ok = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }
}
