//! The alerting rules and the dashboard in `docker/` watch metrics the job really exports: a
//! real job and gateway run against a real broker and database, and every `fleetflow_*` name
//! in `docker/prometheus/fleetflow-rules.yml`, in the Grafana dashboards and in the README's
//! metric tables (which `docker/check.py` checks the rules and dashboards against) is one of
//! theirs. A rule over a misspelt or renamed metric would never fire; promtool cannot know.
//! Series that exist only once something happened (dead letters of a reason, skipped offsets,
//! a stalled partition) are made to exist by making it happen. The dead-letter rule's
//! numerator is also checked to count what was malformed.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{free_port, test_dir, Database, Gateway, Job, Stack};
use fleetflow::cli::{KafkaArgs, LoadgenArgs};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const RECORDS: u64 = 2_000;
/// Messages of partition 1 that "retention" deletes before the job reads them.
const DELETED: i64 = 100;

/// Produces `count` records (5% malformed) from 100 servers, `hours_ago` (runs apart in time,
/// so no (server, time) repeats).
fn produce(stack: &Stack, count: u64, seed: u64, hours_ago: i64) {
    let start = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() - 3600 * hours_ago, 0).unwrap();
    let args = LoadgenArgs {
        start_time: Some(start.to_rfc3339()),
        bad_fraction: 0.05,
        ..stack.loadgen_args(count, 100, seed)
    };
    let report = fleetflow::loadgen::produce(&args, &AtomicBool::new(false)).unwrap();
    assert_eq!((report.delivered, report.failed), (count, 0), "not every record was acknowledged");
}

/// /metrics of a job with a partition it cannot read: librdkafka's mock cluster (in this
/// process, over TCP) answers metadata and offsets, so messages wait, and fails every fetch
/// with an authorization error (as in tests/unreadable_partition.rs).
fn stalled_partition_metrics() -> String {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("metrics", 1, 1).unwrap();
    let kafka = KafkaArgs { brokers: mock.bootstrap_servers(), topic: "metrics".into(), kafka_options: vec![] };
    let report = fleetflow::loadgen::produce(
        &LoadgenArgs::straight_to_kafka(kafka.clone(), 10, 100, 3),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(report.delivered, 100);
    mock.request_errors(RDKafkaApiKey::Fetch, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 5_000]);
    let dir = test_dir("pipeline_alerts_stall");
    let db = Database::create("pipeline_alerts_stall");
    let listen = format!("127.0.0.1:{}", free_port());
    let log = dir.join("job.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetflow"))
        .args(["run", "--brokers", &kafka.brokers, "--topic", "metrics", "--database-url", &db.url])
        .args(["--stall-timeout", "60s", "--report-interval", "500ms", "--metrics-listen", &listen])
        .env("FLEETFLOW_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut job = Job { children: vec![child], logs: vec![log], summaries: vec![] };
    common::wait_for_port(&listen, Duration::from_secs(30));
    let url = format!("http://{listen}/metrics");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = scrape(&url);
        if text.contains("fleetflow_partition_stalled{partition=\"0\"} 1") {
            job.kill();
            return text;
        }
        assert!(Instant::now() < deadline, "no stalled partition after 60 s:\n{text}\n{}", job.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn scrape(url: &str) -> String {
    common::runtime().block_on(async {
        let response = reqwest::get(url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(response.status().is_success(), "GET {url}: {}", response.status());
        response.text().await.unwrap()
    })
}

/// The value of an unlabelled sample, or the sum of a labelled family's samples.
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every name a Prometheus server would store from this exposition: the sample names, and for
/// a family declared by `# TYPE` (labelled families have no samples until a label set is seen:
/// dead letters of a reason, a stalled partition) the family name and the sample names its
/// type produces.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (family, kind) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            names.insert(family.to_owned());
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{family}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find([' ', '{']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// `fleetflow_*` metric names in a text (PromQL expressions; names are lower case).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("fleetflow_") {
        let start = from + at;
        let preceded = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if !preceded {
            names.insert(text[start..end].to_owned());
        }
        from = end;
    }
    names
}

/// The `expr:` values of a Prometheus rules file (single-line, or `|` blocks).
fn rule_expressions(rules: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("expr:") else { continue };
        let rest = rest.trim();
        if rest == "|" || rest == "|-" || rest == ">-" || rest == ">" {
            let indent = line.len() - trimmed.len();
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push_str(next.trim());
                block.push('\n');
                lines.next();
            }
            exprs.push(block);
        } else {
            exprs.push(rest.to_owned());
        }
    }
    exprs
}

/// Metric names the README documents: the backticked `fleetflow_*` names in the rows of the
/// job's metric table (from its `| metric | meaning |` header to the first line that is not a
/// row) and in the gateway's `` | `GET /metrics` `` row. `docker/check.py` reads them the same
/// way.
fn documented(readme: &str) -> BTreeSet<String> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in readme.lines() {
        in_table = (in_table && line.starts_with('|')) || line == "| metric | meaning |";
        if in_table || line.starts_with("| `GET /metrics`") {
            rows.push(line);
        }
    }
    rows.iter()
        .flat_map(|l| l.split('`').skip(1).step_by(2).filter(|s| s.starts_with("fleetflow_")).collect::<Vec<_>>())
        .map(|s| s.split('{').next().unwrap().to_owned())
        .collect()
}

#[test]
fn every_metric_the_alert_rules_and_the_dashboard_watch_is_one_the_job_and_gateway_export() {
    let repo = common::repo();
    let rules = std::fs::read_to_string(repo.join("docker/prometheus/fleetflow-rules.yml")).unwrap();
    let exprs = rule_expressions(&rules);
    assert!(exprs.len() >= 8, "expected the rules' expressions, found {exprs:?}");
    let in_rules: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(in_rules.len() >= 8, "expected the rules to use the job's metrics, found {in_rules:?}");
    let mut in_dashboards = BTreeSet::new();
    for entry in std::fs::read_dir(repo.join("docker/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            for panel in dashboard["panels"].as_array().unwrap() {
                for target in panel["targets"].as_array().into_iter().flatten() {
                    in_dashboards.extend(metric_names(target["expr"].as_str().unwrap_or("")));
                }
            }
        }
    }
    assert!(in_dashboards.len() >= 8, "expected the dashboard to use the job's metrics, found {in_dashboards:?}");
    let in_readme = documented(&std::fs::read_to_string(repo.join("README.md")).unwrap());
    assert!(in_readme.len() >= 20, "expected the README's metric tables, found {in_readme:?}");

    // Some families have no series until their event happens (prometheus-client writes nothing,
    // not even `# TYPE`, for a family without a label set): so the job below meets each event.
    // Its input: malformed records (5%, the dead letters by reason), and messages retention
    // deleted before it read them (skipped offsets); a second job, a partition it cannot read.
    let stack = Stack::start("pipeline_alerts", 2);
    produce(&stack, 1_000, 1, 3);
    Job::start(&stack, "first", 1, 2, &["--exit-when-idle", "2s"]).wait_success(Duration::from_secs(120));
    let (partition, committed) = stack.end_offsets(2)[1];
    produce(&stack, RECORDS, 2, 2);
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(&stack.topic, partition, rdkafka::Offset::Offset(committed + DELETED)).unwrap();
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.broker.addr).create().unwrap();
    let options = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let deleted = common::runtime().block_on(admin.delete_records(&list, &options)).unwrap();
    assert_eq!(deleted.elements()[0].error(), Ok(()), "DeleteRecords");
    let dead_before = stack.db.scalar("SELECT count(*) FROM fleetflow_dead_letters");

    let gateway = Gateway::start(&stack, &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut job = Job::start(&stack, "second", 1, 2, &["--metrics-listen", &listen, "--report-interval", "500ms"]);
    common::wait_for_port(&listen, Duration::from_secs(30));
    let url = format!("http://{listen}/metrics");
    // Scrape until everything left to read is durable, as rows or dead letters, the gap is
    // counted and the lag is back to 0.
    let expected = (RECORDS - DELETED as u64) as f64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let text = loop {
        let text = scrape(&url);
        let written =
            value(&text, "fleetflow_rows_written_total") + value(&text, "fleetflow_dead_letters_written_total");
        if value(&text, "fleetflow_records_read_total") == expected
            && written == expected
            && value(&text, "fleetflow_skipped_offsets_total") == DELETED as f64
            && text.contains("fleetflow_partition_lag{")
            && value(&text, "fleetflow_consumer_lag") == 0.0
        {
            break text;
        }
        if let Some(status) = job.children[0].try_wait().unwrap() {
            panic!("the job exited ({status}) before it wrote everything\n{}", job.log_tail());
        }
        assert!(Instant::now() < deadline, "not everything was written after 120 s:\n{text}\n{}", job.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    };
    // The gateway's families appear with its first request: one valid record, one malformed.
    let body =
        format!("{{\"serverId\":\"g1\",\"cpu\":1,\"ram\":2,\"ts\":{}}}\nnot json\n", fleetflow::record::now_ms());
    let status = common::runtime().block_on(async {
        reqwest::Client::new().post(format!("{}/v1/metrics", gateway.url)).body(body).send().await.unwrap().status()
    });
    assert_eq!(status.as_u16(), 400, "one record accepted, one rejected");
    let gateway_text = scrape(&format!("{}/metrics", gateway.url));
    let stalled_text = stalled_partition_metrics();
    let mut names = exported(&text);
    names.extend(exported(&gateway_text));
    names.extend(exported(&stalled_text));

    let missing = |used: &BTreeSet<String>| used.iter().filter(|n| !names.contains(*n)).cloned().collect::<Vec<_>>();
    assert_eq!(missing(&in_rules), Vec::<String>::new(), "used by fleetflow-rules.yml, not exported:\n{text}");
    assert_eq!(missing(&in_dashboards), Vec::<String>::new(), "used by the dashboard, not exported:\n{text}");
    assert_eq!(missing(&in_readme), Vec::<String>::new(), "in the README's metric tables, not exported:\n{text}");
    // Counters are exported as counters (rate() and increase() in the rules rely on it).
    for name in in_rules.iter().filter(|n| n.ends_with("_total")) {
        let family = name.trim_end_matches("_total");
        assert!(text.contains(&format!("# TYPE {family} counter\n")), "{name} is not a counter:\n{text}");
    }

    // FleetflowDeadLetterRateHigh divides dead letters committed by records read: the malformed
    // records are in its numerator, as many as the by-reason series the dashboard shows.
    let dead = value(&text, "fleetflow_dead_letters_written_total");
    let bad = stack.db.scalar("SELECT count(*) FROM fleetflow_dead_letters") - dead_before;
    assert!(bad > 0, "the loadgen sent no malformed record");
    assert_eq!(dead, bad as f64, "dead letters committed per /metrics and per the table");
    assert_eq!(value(&text, "fleetflow_dead_letters_total"), dead, "dead letters by reason add up to those committed");
    job.kill();
}
