//! The HTTP ingest gateway against a real broker: validation shared with the job, limits,
//! line protocol, health and metrics, a broker outage, shutdown, and end to end through the
//! job: what the gateway acknowledged is exactly what lands in TimescaleDB.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::{messages_in_topic, Gateway, Job, Stack};
use serde_json::Value;

struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

fn post(url: &str, body: &str) -> Reply {
    let rt = common::runtime();
    rt.block_on(async {
        let response = reqwest::Client::new().post(url).body(body.to_owned()).send().await.unwrap();
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        let bytes = response.bytes().await.unwrap();
        Reply { status, retry_after, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
    })
}

fn get(url: &str) -> (u16, String) {
    common::runtime().block_on(async {
        let response = reqwest::Client::new().get(url).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    })
}

fn record(server: &str, cpu: f64) -> String {
    format!(r#"{{"serverId":"{server}","cpu":{cpu},"ram":50,"ts":{}}}"#, fleetflow::record::now_ms() - 1000)
}

#[test]
fn gateway_validates_limits_and_acknowledges_only_what_kafka_has() {
    let mut stack = Stack::start("gateway", 2);
    let gw = Gateway::start(
        &stack,
        &["--max-body-bytes", "20000", "--rate-limit", "5", "--rate-burst", "5", "--produce-timeout", "2s"],
    );
    let api = format!("{}/v1/metrics", gw.url);
    let mut acknowledged = 0;

    let r = post(&api, &record("a1", 10.0));
    assert_eq!((r.status, r.body["accepted"].as_u64()), (202, Some(1)), "{}", r.body);
    acknowledged += 1;

    let r = post(&api, &format!("[{}, {}, {}]", record("a2", 1.0), record("a3", 2.0), record("a4", 3.0)));
    assert_eq!((r.status, r.body["accepted"].as_u64()), (202, Some(3)), "{}", r.body);
    acknowledged += 3;

    // Mixed NDJSON: the valid records go through, each invalid one has its reason.
    let body = format!("{}\n{{\"serverId\":\"\",\"cpu\":1}}\n{}\nnot json\n", record("b1", 1.0), record("b2", 2.0));
    let r = post(&api, &body);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["accepted"], 2);
    let rejected = r.body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0]["index"], 1);
    assert_eq!(rejected[0]["reason"], "serverId is empty");
    assert_eq!(rejected[1]["index"], 3);
    assert!(rejected[1]["reason"].as_str().unwrap().starts_with("malformed JSON"), "{}", r.body);
    acknowledged += 2;

    // What PostgreSQL cannot store (a NUL in the serverId or in a field name, a jsonb key) is
    // refused with the decoder's reason; the valid record beside it goes through.
    let ts = fleetflow::record::now_ms() - 1000;
    let nul_id = format!(r#"{{"serverId":"p\u0000x","cpu":1,"ts":{ts}}}"#);
    let nul_field = format!(r#"{{"serverId":"p2","cpu":1,"d\u0000isk":3,"ts":{ts}}}"#);
    let r = post(&api, &format!("{nul_id}\n{}\n{nul_field}\n", record("b3", 3.0)));
    assert_eq!((r.status, r.body["accepted"].as_u64()), (400, Some(1)), "{}", r.body);
    let rejected = r.body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2, "{}", r.body);
    assert_eq!((&rejected[0]["index"], &rejected[1]["index"]), (&Value::from(0), &Value::from(2)));
    assert_eq!(
        rejected[0]["reason"],
        r#"serverId "p\0x" contains a NUL character (U+0000), which PostgreSQL text and jsonb cannot store"#
    );
    assert_eq!(
        rejected[1]["reason"],
        r#"field name "d\0isk" contains a NUL character (U+0000), which PostgreSQL text and jsonb cannot store"#
    );
    acknowledged += 1;

    // Size limit.
    let big = format!("[{}]", vec![record("c", 1.0); 400].join(","));
    assert!(big.len() > 20_000);
    assert_eq!(post(&api, &big).status, 413);

    // Per-server token bucket: 5 at once, then 429 with Retry-After; other servers unaffected.
    let burst: Vec<String> = (0..8).map(|i| record("hot", i as f64)).collect();
    let r = post(&api, &burst.join("\n"));
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.retry_after.is_some(), "429 without Retry-After");
    assert_eq!(r.body["accepted"], 5);
    assert_eq!(r.body["retry"], serde_json::json!([5, 6, 7]), "{}", r.body);
    acknowledged += 5;

    // Line protocol: Telegraf's cpu and mem lines for one host and time become one record.
    let lines = "cpu,host=lp1 usage_active=12.5 1700000000\nmem,host=lp1 used_percent=40 1700000000\n";
    let now_s = fleetflow::record::now_ms() / 1000;
    let r = post(&format!("{}/api/v2/write?precision=s", gw.url), &lines.replace("1700000000", &now_s.to_string()));
    assert_eq!((r.status, r.body["accepted"].as_u64()), (202, Some(1)), "{}", r.body);
    acknowledged += 1;

    let (status, _) = get(&format!("{}/healthz", gw.url));
    assert_eq!(status, 200);
    let (_, metrics) = get(&format!("{}/metrics", gw.url));
    assert!(
        metrics.contains(&format!("fleetflow_gateway_records_total{{outcome=\"accepted\"}} {acknowledged}")),
        "{metrics}"
    );
    assert!(metrics.contains("fleetflow_gateway_rejections_total{reason=\"empty_server_id\"} 1"), "{metrics}");
    assert!(metrics.contains("fleetflow_gateway_rejections_total{reason=\"unstorable_text\"} 2"), "{metrics}");
    assert!(metrics.contains("fleetflow_gateway_produce_latency_seconds_count"), "{metrics}");

    // Exactly what was acknowledged is in Kafka.
    assert_eq!(messages_in_topic(&stack, 2), acknowledged as i64);

    // Broker down: 503, nothing acknowledged; health says so.
    stack.broker.stop();
    let r = post(&api, &record("d1", 1.0));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["accepted"], 0);
    assert!(r.retry_after.is_some());
    // The record timed out: its fate is unknown (it may be in Kafka), and the reply says which.
    assert_eq!(r.body["unknown"], serde_json::json!([0]), "{}", r.body);
    // /healthz answers from a periodic check (every 2 s by default).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while get(&format!("{}/healthz", gw.url)).0 != 503 {
        assert!(std::time::Instant::now() < deadline, "/healthz still 200 with the broker down");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn gateway_shutdown_flushes_and_exits_cleanly() {
    let stack = Stack::start("gateway_shutdown", 2);
    let mut gw = Gateway::start(&stack, &[]);
    let r = post(&format!("{}/v1/metrics", gw.url), &record("s1", 1.0));
    assert_eq!(r.status, 202);
    let _ = std::process::Command::new("kill").args(["-TERM", &gw.child.id().to_string()]).status();
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "gateway exit {status}\n{}", gw.log_text());
    assert!(gw.log_text().contains("flushing the producer"), "{}", gw.log_text());
    assert_eq!(messages_in_topic(&stack, 2), 1);
}

#[test]
fn what_the_gateway_acknowledged_lands_exactly_once_in_timescale() {
    let stack = Stack::start("gateway_e2e", 4);
    let gw = Gateway::start(&stack, &[]);
    let args = fleetflow::cli::LoadgenArgs {
        bad_fraction: 0.02,
        gateway: Some(gw.url.clone()),
        http_batch: 250,
        connections: 4,
        ..stack.loadgen_args(20_000, 500, 4)
    };
    let report = fleetflow::loadgen::produce(&args, &AtomicBool::new(false)).unwrap();
    assert_eq!(report.sent, 20_000);
    assert!(report.rejected > 200, "the bad records were not rejected: {report:?}");
    assert_eq!(report.delivered + report.rejected, report.sent, "{report:?}");

    let mut job = Job::start(&stack, "job", 1, 2, &["--exit-when-idle", "2s"]);
    job.wait_success(Duration::from_secs(120));
    assert_eq!(stack.db.scalar("SELECT count(*) FROM metrics"), report.delivered as i64);
    assert_eq!(
        stack.db.scalar("SELECT count(*) FROM (SELECT DISTINCT server_id, time FROM metrics) d"),
        report.delivered as i64
    );
    assert_eq!(
        stack.db.scalar("SELECT count(*) FROM fleetflow_dead_letters"),
        0,
        "the gateway let a bad record through"
    );
}
