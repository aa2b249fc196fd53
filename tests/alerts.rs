//! The alert rules fire and resolve as the rules say over the raw rows, exactly once in the
//! `alerts` table and in a real Alertmanager, across late data, restarts and SIGKILL; bad
//! rules are refused with one line.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::{Alertmanager, Job, Stack};
use rdkafka::producer::{BaseRecord, Producer};

const MINUTE_MS: i64 = 60_000;

const RULES: &str = r#"
[[alert]]
name = "cpu-hot"
metric = "cpu"
aggregate = "avg"
above = 90.0
for = "3m"
labels = { severity = "page" }

[[alert]]
name = "server-silent"
silent_for = "30s"
"#;

fn write_rules(stack: &Stack) -> String {
    let path = stack.dir.join("rules.toml");
    std::fs::write(&path, RULES).unwrap();
    path.display().to_string()
}

/// Sends `(server, ts ms, cpu)` records, keyed by server.
fn send(stack: &Stack, records: &[(&str, i64, f64)]) {
    let producer = fleetflow::kafka::producer::producer(
        &stack.broker.kafka(&stack.topic).into(),
        fleetflow::loadgen::ArcContext(Default::default()),
    )
    .unwrap();
    for (server, ts, cpu) in records {
        let body = format!(r#"{{"serverId":"{server}","cpu":{cpu},"ram":40,"ts":{ts}}}"#);
        producer.send(BaseRecord::to(&stack.topic).key(*server).payload(&body)).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// (rule, server, started ms, resolved ms) of every row of the alerts table.
fn alert_rows(stack: &Stack) -> Vec<(String, String, i64, Option<i64>)> {
    let rt = common::runtime();
    rt.block_on(async {
        let client = fleetflow::sink::connect(&stack.db.url).await.unwrap();
        client
            .query(
                "SELECT rule, coalesce(server_id, ''), (extract(epoch FROM started) * 1000)::bigint,
                        (extract(epoch FROM resolved) * 1000)::bigint FROM alerts ORDER BY 1, 2, 3",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    })
}

/// What the cpu-hot rule says over the raw rows, computed here independently: per server,
/// the minutes' averages; every run of at least 3 consecutive complete minutes above 90 (a
/// minute is complete once the server reported in a later one) is an alert from the run's
/// first minute to the end of its last, or still firing if the next minute is the newest.
fn expected_cpu_hot(stack: &Stack) -> BTreeSet<(String, i64, Option<i64>)> {
    let rt = common::runtime();
    let minutes: Vec<(String, i64, Option<f64>)> = rt.block_on(async {
        let client = fleetflow::sink::connect(&stack.db.url).await.unwrap();
        client
            .query(
                "SELECT server_id, (extract(epoch FROM time_bucket('1 minute', time)) * 1000)::bigint, avg(cpu)
                 FROM metrics GROUP BY 1, 2 ORDER BY 1, 2",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    });
    let mut by_server: BTreeMap<String, Vec<(i64, bool)>> = BTreeMap::new();
    for (server, minute, avg) in minutes {
        by_server.entry(server).or_default().push((minute, avg.is_some_and(|a| a > 90.0)));
    }
    let mut expected = BTreeSet::new();
    for (server, minutes) in by_server {
        let newest = minutes.last().unwrap().0;
        let mut run: Vec<i64> = Vec::new();
        let mut flush = |run: &mut Vec<i64>, open: bool| {
            if run.len() >= 3 {
                let end = run[run.len() - 1] + MINUTE_MS;
                expected.insert((server.clone(), run[0], (!open).then_some(end)));
            }
            run.clear();
        };
        for &(minute, hot) in &minutes[..minutes.len() - 1] {
            if hot && run.last().is_none_or(|last| *last + MINUTE_MS == minute) {
                run.push(minute);
            } else {
                flush(&mut run, false);
                if hot {
                    run.push(minute);
                }
            }
        }
        let open = run.last().is_some_and(|last| *last + MINUTE_MS == newest);
        flush(&mut run, open);
    }
    expected
}

fn cpu_hot_rows(stack: &Stack) -> BTreeSet<(String, i64, Option<i64>)> {
    let rows: Vec<_> = alert_rows(stack).into_iter().filter(|r| r.0 == "cpu-hot").collect();
    let set: BTreeSet<_> = rows.iter().map(|(_, s, a, b)| (s.clone(), *a, *b)).collect();
    assert_eq!(set.len(), rows.len(), "an alert was written twice: {rows:?}");
    set
}

/// (alertname, server) of what Alertmanager shows as active.
fn am_active(am: &Alertmanager) -> BTreeSet<(String, String)> {
    am.alerts()
        .iter()
        .filter(|a| a["status"]["state"] == "active")
        .map(|a| {
            let labels = &a["labels"];
            (labels["alertname"].as_str().unwrap().to_owned(), labels["server"].as_str().unwrap_or("").to_owned())
        })
        .collect()
}

fn firing_rows(stack: &Stack) -> BTreeSet<(String, String)> {
    alert_rows(stack).into_iter().filter(|r| r.3.is_none()).map(|r| (r.0, r.1)).collect()
}

/// Waits until Alertmanager shows exactly the firing rows (it groups for a moment).
fn assert_alertmanager_agrees(am: &Alertmanager, stack: &Stack) {
    let firing = firing_rows(stack);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let active = am_active(am);
        if active == firing {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "Alertmanager shows {active:?}, the table fires {firing:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_hot_server_fires_once_and_resolves_once_late_data_changes_the_outcome_and_silence_fires() {
    let stack = Stack::start("alerts", 2);
    let am = Alertmanager::start(&stack.dir);
    let rules = write_rules(&stack);
    let now = fleetflow::record::now_ms();
    // Minutes of simulated time, 20 minutes ago onwards, four reports per minute.
    let base = (now - 20 * MINUTE_MS) / MINUTE_MS * MINUTE_MS;
    let minute = |k: i64, cpu: f64, server: &'static str| {
        (0..4).map(move |i| (server, base + k * MINUTE_MS + i * 15_000, cpu)).collect::<Vec<_>>()
    };
    let mut records = Vec::new();
    // "hot": 3 hot minutes, then it cools.
    for (k, cpu) in [(0, 50.0), (1, 95.0), (2, 96.0), (3, 97.0), (4, 40.0), (5, 40.0)] {
        records.extend(minute(k, cpu, "hot"));
    }
    // "late": hot, cool, hot, hot, cool: no 3 in a row yet.
    for (k, cpu) in [(0, 95.0), (1, 50.0), (2, 95.0), (3, 95.0), (4, 10.0), (5, 10.0)] {
        records.extend(minute(k, cpu, "late"));
    }
    // "join": two alerts, hot 0-2 and hot 4-6 with 7 the newest; a late report will make
    // the cool minute 3 hot and join them into one, still firing.
    for (k, cpu) in [(0, 95.0), (1, 95.0), (2, 95.0), (3, 50.0), (4, 95.0), (5, 95.0), (6, 95.0), (7, 40.0)] {
        records.extend(minute(k, cpu, "join"));
    }
    // "fresh" reports now (not silent); "warm" never breaches.
    records.push(("fresh", now - 1_000, 20.0));
    for k in 0..6 {
        records.extend(minute(k, 60.0, "warm"));
    }
    send(&stack, &records);
    let config = ["--config", rules.as_str(), "--alertmanager-url", am.url.as_str()];
    let mut job = Job::start(&stack, "first", 1, 2, &[&config[..], &["--exit-when-idle", "2s"]].concat());
    job.wait_success(Duration::from_secs(90));

    let hot = cpu_hot_rows(&stack);
    let one_episode = (base + MINUTE_MS, Some(base + 4 * MINUTE_MS));
    assert_eq!(
        hot,
        BTreeSet::from([
            ("hot".to_owned(), one_episode.0, one_episode.1),
            ("join".to_owned(), base, Some(base + 3 * MINUTE_MS)),
            ("join".to_owned(), base + 4 * MINUTE_MS, None),
        ])
    );
    assert_eq!(hot, expected_cpu_hot(&stack));
    let silent: BTreeSet<String> =
        alert_rows(&stack).into_iter().filter(|r| r.0 == "server-silent" && r.3.is_none()).map(|r| r.1).collect();
    assert_eq!(silent, ["hot", "join", "late", "warm"].map(String::from).into(), "fresh reported a second ago");
    assert_alertmanager_agrees(&am, &stack);

    // Late reports make the cool minute 1 of "late" hot (average (4 x 50 + 3 x 190) / 7 = 110):
    // minutes 0-3 are a run now.
    let late_minute = base + MINUTE_MS;
    let join_minute = base + 3 * MINUTE_MS;
    send(
        &stack,
        &[
            ("late", late_minute + 1_000, 190.0),
            ("late", late_minute + 2_000, 190.0),
            ("late", late_minute + 3_000, 190.0),
            ("join", join_minute + 1_000, 190.0),
            ("join", join_minute + 2_000, 190.0),
            ("join", join_minute + 3_000, 190.0),
        ],
    );
    let mut second = Job::start(&stack, "second", 1, 1, &[&config[..], &["--exit-when-idle", "2s"]].concat());
    second.wait_success(Duration::from_secs(90));
    let hot = cpu_hot_rows(&stack);
    assert!(hot.contains(&("late".to_owned(), base, Some(base + 4 * MINUTE_MS))), "{hot:?}");
    // The resolved and the firing alert of "join" became one alert, still firing.
    assert!(hot.contains(&("join".to_owned(), base, None)), "{hot:?}");
    assert_eq!(hot, expected_cpu_hot(&stack));
    assert_eq!(hot.len(), 3, "the restart repeated nothing: {hot:?}");

    // "fresh" reports again; "hot" reports now: its silence ends, exactly once.
    send(&stack, &[("hot", fleetflow::record::now_ms(), 10.0)]);
    let mut third = Job::start(&stack, "third", 1, 1, &[&config[..], &["--exit-when-idle", "2s"]].concat());
    third.wait_success(Duration::from_secs(90));
    let rows = alert_rows(&stack);
    let hot_silences: Vec<_> = rows.iter().filter(|r| r.0 == "server-silent" && r.1 == "hot").collect();
    assert_eq!(hot_silences.len(), 1, "{rows:?}");
    assert!(hot_silences[0].3.is_some(), "the silence of hot ended: {rows:?}");
    assert_alertmanager_agrees(&am, &stack);

    let out = Command::new(env!("CARGO_BIN_EXE_fleetflow"))
        .args(["query", "--database-url", &stack.db.url, "alerts", "--active", "--format", "csv"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("rule,server,state,started,resolved,value,labels\n"), "{text}");
    assert_eq!(text.lines().count(), 1 + firing_rows(&stack).len(), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("server-silent,hot,")), "hot reported again: {text}");
    assert!(text.lines().any(|l| l.starts_with("cpu-hot,join,firing,")), "{text}");
}

/// A job catching up on a backlog reads it far ahead of the database (up to its in-flight
/// bound), so when it reaches the end of its partitions the newest minutes are still on
/// their way: the clock waits until they are durable and taken, and no server that
/// reported a moment ago is found silent.
#[test]
fn a_backlog_read_ahead_of_the_database_raises_no_silence() {
    let stack = Stack::start("alerts_backlog", 2);
    let rules = stack.dir.join("silent.toml");
    std::fs::write(&rules, "[[alert]]\nname = \"server-silent\"\nsilent_for = \"10m\"\n").unwrap();
    let servers: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
    let reports = |from_ms: i64, to_ms: i64| {
        let mut records = Vec::new();
        for t in (from_ms..to_ms).step_by(30_000) {
            records.extend(servers.iter().map(|s| (s.as_str(), t, 20.0)));
        }
        records
    };
    // Twelve minutes old and more, written without rules: the next run loads these servers
    // with their newest report 12 minutes back.
    let now = fleetflow::record::now_ms();
    let old = reports(now - 24 * MINUTE_MS, now - 12 * MINUTE_MS);
    send(&stack, &old);
    Job::start(&stack, "old", 1, 2, &["--exit-when-idle", "2s"]).wait_success(Duration::from_secs(90));

    // The last twelve minutes, up to a second ago, while the rows' table is locked: the
    // job reads all of it and reaches the end long before any of it is durable.
    let backlog = reports(now - 12 * MINUTE_MS + 30_000, now - 1_000);
    send(&stack, &backlog);
    let url = stack.db.url.clone();
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let lock = std::thread::spawn(move || {
        common::runtime().block_on(async {
            let mut client = fleetflow::sink::connect(&url).await.unwrap();
            let tx = client.transaction().await.unwrap();
            tx.batch_execute("LOCK TABLE metrics IN SHARE MODE").await.unwrap();
            locked_tx.send(()).unwrap();
            tokio::time::sleep(Duration::from_secs(8)).await;
            tx.commit().await.unwrap();
        })
    });
    locked.recv().unwrap();
    let config = ["--config", rules.to_str().unwrap(), "--exit-when-idle", "2s"];
    let mut job = Job::start(&stack, "backlog", 1, 2, &config);
    lock.join().unwrap();
    job.wait_success(Duration::from_secs(90));

    let landed = stack.db.scalar("SELECT count(*) FROM metrics");
    assert_eq!(landed as usize, old.len() + backlog.len(), "every report landed");
    let silences: Vec<_> = alert_rows(&stack).into_iter().filter(|r| r.0 == "server-silent").collect();
    assert!(silences.is_empty(), "every server reported within the last 30 s: {silences:?}");
}

#[test]
fn a_sigkill_at_any_point_neither_loses_repeats_nor_invents_an_alert() {
    let stack = Stack::start("alerts_crash", 4);
    let am = Alertmanager::start(&stack.dir);
    let rules = write_rules(&stack);
    // 300 servers x 120 reports at 10 s: 20 simulated minutes, ending about 2 minutes ago.
    let start = fleetflow::record::now_ms() - 22 * MINUTE_MS;
    let args = fleetflow::cli::LoadgenArgs {
        interval: Duration::from_secs(10),
        start_time: Some(fleetflow::record::format_micros(start * 1000)),
        ..stack.loadgen_args(36_000, 300, 5)
    };
    fleetflow::loadgen::produce(&args, &std::sync::atomic::AtomicBool::new(false)).unwrap();
    // The window (the longest `for`, 3m, plus the lateness, plus one minute) covers all 20
    // minutes, so the episodes over all the data (expected_cpu_hot) are what the rules promise
    // however far a job gets before its first evaluation. With a shorter window, a run of hot
    // minutes longer than it may start at the window's edge when a job first sees it after a
    // crash or in a backlog: the documented lateness limit, not what this test is about.
    let config = ["--config", rules.as_str(), "--alertmanager-url", am.url.as_str(), "--alert-lateness", "20m"];
    let throttle = ["--epoch-records", "300", "--max-epochs-in-flight", "2"];
    for (label, rows) in [("first", 6_000), ("second", 18_000)] {
        let mut job = Job::start(&stack, label, 2, 1, &[&config[..], &throttle[..]].concat());
        stack.wait_for_rows(rows, Duration::from_secs(120), &mut job);
        job.crash(0, Duration::from_secs(20));
    }
    let mut last = Job::start(&stack, "last", 1, 2, &[&config[..], &["--exit-when-idle", "2s"]].concat());
    last.wait_success(Duration::from_secs(180));
    common::assert_exactly_once(&stack, 36_000, 4);

    let expected = expected_cpu_hot(&stack);
    assert!(!expected.is_empty(), "the load generator makes some servers hot for 3 minutes");
    assert_eq!(cpu_hot_rows(&stack), expected);
    let silent = alert_rows(&stack).into_iter().filter(|r| r.0 == "server-silent").count();
    assert_eq!(silent, 300, "every server went quiet two minutes ago, each once");
    assert_alertmanager_agrees(&am, &stack);
}

#[test]
fn bad_rules_are_refused_at_start_with_one_line() {
    let dir = common::test_dir("alerts-bad-rules");
    for (rule, expected) in [
        ("metric = \"serverId\"\nabove = 1", "metric \"serverId\" names the record's key"),
        ("metric = \"cpu\"\nabove = 1\nfor = \"3 fortnights\"", "for \"3 fortnights\" is not a duration"),
        ("silent_for = \"-5s\"", "silent_for \"-5s\" is not a duration"),
    ] {
        let path = dir.join("bad.toml");
        std::fs::write(&path, format!("[[alert]]\nname = \"r\"\n{rule}\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_fleetflow"))
            .args(["run", "--config"])
            .arg(&path)
            .args(["--brokers", "127.0.0.1:1", "--database-url", "postgres://nobody@127.0.0.1:1/x"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("alert rule 1 (\"r\")") && stderr.contains(expected), "{stderr}");
    }
}
