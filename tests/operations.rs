//! Operations: the job's /metrics while it runs, `status`, `check`, the config file's
//! precedence and unknown keys, retention, and a 3-process job losing one process.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{assert_exactly_once, free_port, test_dir, Job, Stack};

fn fleetflow(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetflow"))
        .args(args)
        .env_remove("FLEETFLOW_WORKERS")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn scrape(url: &str) -> String {
    common::runtime().block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[test]
fn metrics_move_during_a_run_and_status_reports_the_result() {
    let stack = Stack::start("ops_metrics", 2);
    let producer = stack.produce_in_background(40_000, 300, 21, 5_000.0);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut job = Job::start(&stack, "job", 1, 2, &["--metrics-listen", &listen, "--exit-when-idle", "2s"]);
    common::wait_for_port(&listen, Duration::from_secs(30));
    stack.wait_for_rows(1, Duration::from_secs(60), &mut job);
    // Scrape until every counter has moved between two scrapes (the producer runs for 8 s).
    let first = scrape(&format!("http://{listen}/metrics"));
    let counters = ["fleetflow_records_read_total", "fleetflow_rows_written_total", "fleetflow_copy_seconds_count"];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let second = loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = scrape(&format!("http://{listen}/metrics"));
        if counters.iter().all(|name| metric(&now, name) > metric(&first, name)) {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "counters did not move during the run:\n{first}\n---\n{now}");
    };
    for name in
        ["fleetflow_durable_epoch", "fleetflow_consumer_lag", "fleetflow_backpressured", "fleetflow_database_waiting"]
    {
        metric(&second, name);
    }
    assert!(scrape(&format!("http://{listen}/healthz")).contains("\"database_waiting\":false"));
    producer.join().unwrap();
    job.wait_success(Duration::from_secs(120));
    assert_exactly_once(&stack, 40_000, 2);

    let (code, out, err) =
        fleetflow(&["status", "--brokers", &stack.broker.addr, "--database-url", &stack.db.url], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("total lag: 0 messages"), "{out}");
    assert!(out.contains("dead letters: 0"), "{out}");
    assert!(out.contains("(up to date with the raw rows)"), "rollup freshness: {out}");
    let table_rows = out.lines().filter(|l| l.trim_start().starts_with(['0', '1']) && l.contains("ago")).count();
    assert_eq!(table_rows, 2, "{out}");
}

#[test]
fn config_file_precedence_unknown_keys_and_check() {
    let dir = test_dir("ops_config");
    let file = dir.join("fleetflow.toml");
    let dead_db = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    let dead_kafka = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &file,
        format!("workers = 3\nbrokers = \"{dead_kafka}\"\ndatabase_url = \"{dead_db}\"\n[kafka]\n\"socket.timeout.ms\" = \"2000\"\n"),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    // file > default
    let (_, out, _) = fleetflow(&["check", "--config", config], &[]);
    assert!(out.contains("x 3 worker(s)"), "{out}");
    // env > file
    let (_, out, _) = fleetflow(&["check", "--config", config], &[("FLEETFLOW_WORKERS", "5")]);
    assert!(out.contains("x 5 worker(s)"), "{out}");
    // flag > env
    let (code, out, err) = fleetflow(&["check", "--config", config, "--workers", "7"], &[("FLEETFLOW_WORKERS", "5")]);
    assert!(out.contains("x 7 worker(s)"), "{out}");
    // check says what is wrong: the broker and the database from the file are unreachable.
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(&format!("FAIL kafka: cannot reach Kafka at {dead_kafka}")), "{out}");
    assert!(out.contains("FAIL database: cannot reach the database at 127.0.0.1"), "{out}");

    std::fs::write(&file, "workers = 3\nepoch_recordz = 10\n").unwrap();
    let (code, out, err) = fleetflow(&["run", "--config", config], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unknown key `epoch_recordz`"), "{err}");
}

#[test]
fn check_finds_a_missing_topic_and_passes_on_a_good_setup() {
    let stack = Stack::start("ops_check", 2);
    let base = ["check", "--brokers", &stack.broker.addr, "--database-url", &stack.db.url];
    let (code, out, _) = fleetflow(&[&base[..], &["--topic", "missing"]].concat(), &[]);
    assert_eq!(code, 1);
    assert!(out.contains("FAIL kafka: topic \"missing\" does not exist"), "{out}");
    let (code, out, err) = fleetflow(&base, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok   topic metrics: 2 partitions"), "{out}");
    assert!(out.contains("ok   timescaledb:"), "{out}");
}

#[test]
fn retention_drops_old_chunks_only() {
    let stack = Stack::start("ops_retention", 2);
    let old = fleetflow::record::format_micros((fleetflow::record::now_ms() - 20 * 86_400_000) * 1000);
    let mut loadgen = vec!["loadgen", "--brokers", &stack.broker.addr, "--count", "1000", "--servers", "10"];
    let (code, out, err) = fleetflow(&[&loadgen[..], &["--start-time", &old]].concat(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    loadgen.extend(["--seed", "2"]);
    let (code, out, err) = fleetflow(&loadgen, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let mut job = Job::start(&stack, "job", 1, 1, &["--exit-when-idle", "2s"]);
    job.wait_success(Duration::from_secs(120));
    assert_eq!(stack.db.metric_rows(), 2000);

    let (code, out, err) = fleetflow(&["retention", "--database-url", &stack.db.url, "--older-than", "7d"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("dropped ") && !out.starts_with("dropped 0 "), "{out}");
    assert_eq!(stack.db.metric_rows(), 1000, "only the recent records remain");
    assert_eq!(stack.db.scalar("SELECT count(*) FROM metrics WHERE time < now() - interval '7 days'"), 0);
}

#[test]
fn three_processes_one_killed_the_others_stop_with_a_clear_message() {
    let stack = Stack::start("ops_three", 3);
    stack.produce(60_000, 600, 31, 0.0);
    let mut job = Job::start(&stack, "three", 3, 1, &["--epoch-records", "300", "--max-epochs-in-flight", "4"]);
    stack.wait_for_rows(5_000, Duration::from_secs(120), &mut job);
    let _ = job.children[1].kill();
    let statuses = job.wait(Duration::from_secs(30));
    for (i, status) in statuses.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert_eq!(status.code(), Some(3), "process {i} should stop on its own: {status}\n{}", job.log_tail());
    }
    let logs = job.log_text();
    assert!(logs.contains("fleetflow: lost the connection to another process of the job"), "{}", job.log_tail());
    assert!(!logs.contains("stack backtrace"), "{}", job.log_tail());

    let mut again = Job::start(&stack, "again", 3, 1, &["--exit-when-idle", "2s"]);
    again.wait_success(Duration::from_secs(180));
    assert_exactly_once(&stack, 60_000, 3);
}

#[test]
fn a_process_whose_peers_never_connect_gives_up_with_a_clear_message() {
    let stack = Stack::start("ops_lonely", 2);
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let args: Vec<String> = stack.run_args();
    let mut run: Vec<&str> = args.iter().map(String::as_str).collect();
    run.extend(["--processes", "2", "--process-id", "0", "--hosts", &hosts, "--connect-timeout", "2s"]);
    let started = std::time::Instant::now();
    let (code, _, err) = fleetflow(&run, &[]);
    assert_eq!(code, 3, "{err}");
    let last = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default();
    assert!(last.starts_with("fleetflow: the other processes of the job did not connect within 2s"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(2), "gave up before its timeout");
}
