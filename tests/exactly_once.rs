//! Promise 1 under crashes: SIGKILL of job processes at seeded random moments (during
//! start-up, mid-COPY, between a COPY and its offset commit), and restarts with another
//! shape (processes, workers, database connections per worker), never lose or duplicate a
//! record.

mod common;

use std::time::Duration;

use common::{assert_exactly_once, Job, Stack};

const CHAOS_RECORDS: u64 = 200_000;

fn chaos_seed() -> u64 {
    std::env::var("FLEETFLOW_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_124)
}

#[test]
fn chaos_sigkill_schedule_gives_exactly_once() {
    let seed = chaos_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let stack = Stack::start("chaos", 4);
    // Records keep arriving (40 s at 5,000/s) while the job is being killed. Kill rounds go
    // on for as long as they do (at least 6 rounds), so the schedule hits the job mid-stream
    // however fast or slow this machine runs it.
    let producer = stack.produce_in_background(CHAOS_RECORDS, 2_000, seed, 5_000.0);

    let mut kills = Vec::new();
    while kills.len() < 6 || (!producer.is_finished() && kills.len() < 60) {
        let round = kills.len();
        let mut job = Job::start(&stack, &format!("round{round}"), 2, 2, &[]);
        // From 0 ms (start-up) to 4 s (mid-stream): start-up (timely connecting, taking the
        // topic, checking offsets) takes 1.5-2 s on a loaded 2-core machine.
        let delay = Duration::from_millis(rng.u64(0..4_000));
        std::thread::sleep(delay);
        let victim = rng.usize(0..2);
        let rows_before = stack.db.metric_rows();
        let survivors_exited = job.crash(victim, Duration::from_secs(20));
        kills.push((round, delay, victim, rows_before, survivors_exited));
    }
    producer.join().unwrap();

    let mut last = Job::start(&stack, "final", 2, 2, &["--exit-when-idle", "3s"]);
    last.wait_success(Duration::from_secs(300));
    println!(
        "chaos seed {seed}: {} kills (round, delay, victim, rows at kill, survivors that exited alone):",
        kills.len()
    );
    for k in &kills {
        println!("  {k:?}");
    }
    let mid_stream = kills.iter().filter(|k| k.3 > 0 && k.3 < CHAOS_RECORDS as i64).count();
    assert!(mid_stream >= 5, "only {mid_stream} kills hit the job mid-stream: the schedule tested too little");
    assert_exactly_once(&stack, CHAOS_RECORDS as i64, 4);
}

#[test]
fn restarts_with_another_shape_give_exactly_once() {
    let stack = Stack::start("rescale", 4);
    let total = 150_000u64;
    stack.produce(total, 1_000, 11, 0.0);
    let throttle = ["--epoch-records", "500", "--max-epochs-in-flight", "4"];

    // 1 process x 1 worker with one database connection, killed after 30k rows.
    let mut a = Job::start(&stack, "1x1", 1, 1, &[&throttle[..], &["--sink-connections", "1"]].concat());
    stack.wait_for_rows(30_000, Duration::from_secs(120), &mut a);
    a.crash(0, Duration::ZERO);
    // 2 x 2 with two connections per worker, killed after 80k rows.
    let mut b = Job::start(&stack, "2x2", 2, 2, &[&throttle[..], &["--sink-connections", "2"]].concat());
    stack.wait_for_rows(80_000, Duration::from_secs(120), &mut b);
    b.crash(1, Duration::ZERO);
    let at_kill = stack.db.metric_rows();
    assert!(at_kill < total as i64, "the job finished before the second kill; not a rescale test");
    // 1 x 3 with three connections per worker finishes.
    let mut c = Job::start(&stack, "1x3", 1, 3, &["--exit-when-idle", "2s", "--sink-connections", "3"]);
    c.wait_success(Duration::from_secs(300));
    assert_exactly_once(&stack, total as i64, 4);
}

#[test]
fn natural_key_dedup_drops_repeated_reports() {
    let stack = Stack::start("natural_key", 4);
    let args = fleetflow::cli::LoadgenArgs { duplicate_fraction: 0.1, ..stack.loadgen_args(30_000, 300, 3) };
    let report = fleetflow::loadgen::produce(&args, &std::sync::atomic::AtomicBool::new(false)).unwrap();
    assert_eq!(report.failed, 0);
    assert!(report.duplicates > 2_000, "the loadgen sent only {} repeats", report.duplicates);
    let unique = (report.sent - report.duplicates) as i64;

    let mut job = Job::start(&stack, "run", 1, 2, &["--dedup", "natural-key", "--exit-when-idle", "2s"]);
    job.wait_success(Duration::from_secs(120));
    let db = &stack.db;
    assert_eq!(db.scalar("SELECT count(*) FROM metrics"), unique);
    assert_eq!(db.scalar("SELECT count(*) FROM (SELECT DISTINCT server_id, time FROM metrics) d"), unique);
    // The rollups count only the rows that were new: per server and minute, what SQL counts.
    let rollup_mismatches = "SELECT count(*) FROM metrics_1m r FULL JOIN (
            SELECT server_id, time_bucket('1 minute', time) AS bucket, count(*) AS n, count(cpu) AS cpu_n, max(cpu) AS cpu_max
            FROM metrics GROUP BY 1, 2) s USING (server_id, bucket)
        WHERE r.count IS DISTINCT FROM s.n OR coalesce(r.cpu_count, 0) IS DISTINCT FROM s.cpu_n OR r.cpu_max IS DISTINCT FROM s.cpu_max";
    assert_eq!(db.scalar(rollup_mismatches), 0, "rollups counted a duplicate (or missed a row)");
    // Without the flag the index stays in force: a second run over the same topic adds nothing.
    // (Forgetting the progress bookkeeping makes the second run re-read everything.)
    db.execute("DELETE FROM fleetflow_offsets; DELETE FROM fleetflow_watermarks");
    let mut again = Job::start(&stack, "again", 1, 2, &["--exit-when-idle", "2s"]);
    again.wait_success(Duration::from_secs(120));
    assert_eq!(db.scalar("SELECT count(*) FROM metrics"), unique);
    assert_eq!(db.scalar(rollup_mismatches), 0, "the second run's refused rows reached the rollups");
}
