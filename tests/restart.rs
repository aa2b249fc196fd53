//! Stopping the job half-way with SIGTERM and starting it again loses and duplicates
//! nothing.

mod common;

use std::time::{Duration, Instant};

use common::{assert_exactly_once, Job, Stack};

const RECORDS: u64 = 100_000;

#[test]
fn sigterm_half_way_then_restart_gives_exactly_once() {
    let stack = Stack::start("restart", 4);
    stack.produce(RECORDS, 500, 7, 0.0);

    // Small epochs and a short in-flight window slow the job down enough to stop it mid-way.
    let throttle = ["--epoch-records", "200", "--max-epochs-in-flight", "2"];
    let mut first = Job::start(&stack, "first", 2, 2, &throttle);
    let deadline = Instant::now() + Duration::from_secs(180);
    while stack.db.metric_rows() < 10_000 {
        assert!(Instant::now() < deadline, "no progress\n{}", first.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    first.signal("TERM");
    let statuses = first.wait(Duration::from_secs(60));
    assert!(statuses.iter().all(|s| s.success()), "SIGTERM must exit 0: {statuses:?}\n{}", first.log_tail());
    let after_stop = stack.db.metric_rows();
    assert!(
        after_stop < RECORDS as i64,
        "the job finished before it was stopped ({after_stop} rows); not a restart test"
    );
    // What was durable at the stop was committed.
    let committed: i64 = stack.db.scalar("SELECT coalesce(sum(next_offset), 0)::bigint FROM fleetflow_offsets");
    assert!(committed > 0, "nothing committed at shutdown\n{}", first.log_tail());
    assert!(committed <= after_stop, "offsets committed ({committed}) beyond the rows written ({after_stop})");

    let mut second = Job::start(&stack, "second", 2, 2, &["--exit-when-idle", "2s"]);
    second.wait_success(Duration::from_secs(300));
    assert_exactly_once(&stack, RECORDS as i64, 4);
}
