//! A configuration mistake fails at start with one clear line on stderr and a non-zero exit:
//! no panic, no backtrace, no stuck process.

mod common;

use std::process::Command;

use common::{free_port, script, test_dir, Broker};

/// Runs fleetflow and returns its stderr, asserting it is exactly one `fleetflow: ...` line.
fn fails_with_one_line(args: &[&str]) -> String {
    fails_with_one_line_and_code(args).0
}

/// Like [`fails_with_one_line`], with the exit code.
fn fails_with_one_line_and_code(args: &[&str]) -> (String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetflow")).args(args).env("FLEETFLOW_LOG", "info").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{stderr}");
    assert!(lines[0].starts_with("fleetflow: "), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    (lines[0].to_owned(), out.status.code().unwrap_or(-1))
}

#[test]
fn bad_flags_are_one_line() {
    let line = fails_with_one_line(&["run", "--no-such-flag"]);
    assert!(line.contains("--no-such-flag"), "{line}");
    let line = fails_with_one_line(&["run", "--workers", "many"]);
    assert!(line.contains("many"), "{line}");
    let line = fails_with_one_line(&["query", "server"]);
    assert!(line.contains("<SERVER_ID>"), "the missing argument is named: {line}");
    let (line, code) =
        fails_with_one_line_and_code(&["run", "--processes", "2", "--process-id", "2", "--hosts", "a:1,b:2"]);
    assert!(line.contains("--process-id 2 is outside --processes 2"), "{line}");
    // A flag the configuration refuses is a usage error, like one clap refuses.
    assert_eq!(code, 2, "{line}");
    assert_eq!(fails_with_one_line_and_code(&["run", "--workers", "many"]).1, 2);
    let dir = test_dir("bad_config_hostfile");
    let hostfile = dir.join("hosts");
    std::fs::write(&hostfile, "127.0.0.1:2101\n127.0.0.1:2102\n127.0.0.1:2103\n").unwrap();
    let line = fails_with_one_line(&["run", "--processes", "2", "--hostfile", hostfile.to_str().unwrap()]);
    assert!(line.contains("--processes is 2 but --hostfile") && line.contains("3 address(es)"), "{line}");
}

#[test]
fn unreachable_broker_and_unknown_topic() {
    let dead = format!("127.0.0.1:{}", free_port());
    let line = fails_with_one_line(&["run", "--brokers", &dead, "--database-url", "postgres://postgres@127.0.0.1:1/x"]);
    assert!(line.contains(&format!("cannot reach Kafka at {dead}")), "{line}");
    // No cause repeated in the line (client errors quote their own causes).
    assert_eq!(line.matches("BrokerTransportFailure").count(), 1, "{line}");
    for command in [&["topic", "create"][..], &["loadgen", "--count", "5"][..]] {
        let line = fails_with_one_line(&[command, &["--brokers", &dead][..]].concat());
        assert!(line.contains(&format!("cannot reach Kafka at {dead}")), "{command:?}: {line}");
    }

    let dir = test_dir("bad_config_topic");
    let broker = Broker::start(&dir);
    for command in ["run", "loadgen"] {
        let line = fails_with_one_line(&[command, "--brokers", &broker.addr, "--topic", "nope"]);
        assert!(line.contains("topic \"nope\" does not exist"), "{command}: {line}");
    }
}

#[test]
fn unreachable_database_and_missing_timescaledb() {
    let dir = test_dir("bad_config_db");
    let broker = Broker::start(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(fleetflow::kafka::admin::create_topic(&broker.kafka("metrics").into(), 1, 1)).unwrap();

    let dead = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let line = fails_with_one_line(&["run", "--brokers", &broker.addr, "--database-url", &dead]);
    assert!(line.contains("cannot reach the database at 127.0.0.1"), "{line}");

    // A PostgreSQL server that has timescaledb installed but not preloaded cannot enable it.
    let port = free_port().to_string();
    let data = dir.join("pg-no-preload").display().to_string();
    let env =
        [("FLEETFLOW_PG_PORT", port.clone()), ("FLEETFLOW_PG_DATA", data), ("FLEETFLOW_PG_PRELOAD", String::new())];
    script("timescaledb.sh", &["up"], &env);
    let url = script("timescaledb.sh", &["url"], &env);
    let line = fails_with_one_line(&["run", "--brokers", &broker.addr, "--database-url", &url]);
    script("timescaledb.sh", &["down"], &env);
    assert!(line.contains("timescaledb"), "{line}");
}
