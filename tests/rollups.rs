//! The rollups equal what SQL computes from the raw rows, after crashes, restarts and late
//! data; the fleet percentiles match an independent computation; silent servers are found;
//! and every `fleetflow query` subcommand answers on known data.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Job, Stack};
use rdkafka::producer::{BaseRecord, Producer};

/// Rows of metrics_1m that differ from a GROUP BY over metrics, in either direction.
const ROLLUP_MISMATCHES: &str = "
WITH raw AS (
    SELECT server_id, time_bucket('1 minute', time) AS bucket, count(*) AS count, max(time) AS last_time,
           count(cpu) AS cpu_count, round(sum(cpu)::numeric, 4) AS cpu_sum, min(cpu) AS cpu_min, max(cpu) AS cpu_max,
           count(ram) AS ram_count, round(sum(ram)::numeric, 4) AS ram_sum, min(ram) AS ram_min, max(ram) AS ram_max
    FROM metrics GROUP BY 1, 2),
rollup AS (
    SELECT server_id, bucket, count, last_time, cpu_count, round(cpu_sum::numeric, 4), cpu_min, cpu_max,
           ram_count, round(ram_sum::numeric, 4), ram_min, ram_max
    FROM metrics_1m)
SELECT (SELECT count(*) FROM (SELECT * FROM raw EXCEPT SELECT * FROM rollup) a)
     + (SELECT count(*) FROM (SELECT * FROM rollup EXCEPT SELECT * FROM raw) b)";

/// Minutes whose fleet_1m figures differ from percentile_disc etc. over the raw rows.
const FLEET_MISMATCHES: &str = "
WITH raw AS (
    SELECT time_bucket('1 minute', time) AS bucket, count(DISTINCT server_id) AS servers, max(cpu) AS cpu_max,
           percentile_disc(0.5) WITHIN GROUP (ORDER BY least(greatest(round(cpu::numeric, 1), 0), 100)) AS p50,
           percentile_disc(0.95) WITHIN GROUP (ORDER BY least(greatest(round(cpu::numeric, 1), 0), 100)) AS p95,
           percentile_disc(0.99) WITHIN GROUP (ORDER BY least(greatest(round(ram::numeric, 1), 0), 100)) AS ram_p99
    FROM metrics GROUP BY 1)
SELECT count(*) FROM raw FULL JOIN fleet_1m f USING (bucket)
WHERE f.bucket IS NULL OR raw.bucket IS NULL OR raw.servers <> f.servers OR raw.cpu_max <> f.cpu_max
   OR raw.p50 <> f.cpu_p50::numeric OR raw.p95 <> f.cpu_p95::numeric OR raw.ram_p99 <> f.ram_p99::numeric";

#[test]
fn rollups_equal_sql_after_a_crash_a_restart_and_late_data() {
    let stack = Stack::start("rollups", 4);
    stack.produce(40_000, 400, 12, 0.0);
    let throttle = ["--epoch-records", "300", "--max-epochs-in-flight", "4"];
    let mut first = Job::start(&stack, "first", 2, 2, &throttle);
    stack.wait_for_rows(10_000, Duration::from_secs(120), &mut first);
    first.crash(0, Duration::from_secs(20));
    let mut second = Job::start(&stack, "second", 2, 2, &["--exit-when-idle", "2s"]);
    second.wait_success(Duration::from_secs(180));
    let db = &stack.db;
    assert_eq!(db.metric_rows(), 40_000);
    assert_eq!(db.scalar(ROLLUP_MISMATCHES), 0, "metrics_1m differs from the raw rows after a crash");
    let minutes_before = db.scalar("SELECT count(*) FROM metrics_1m");

    // Late records, for minutes that already have rollups.
    let late_minute: i64 = db.scalar("SELECT (extract(epoch FROM min(bucket)) * 1000)::bigint FROM metrics_1m");
    let args = fleetflow::cli::LoadgenArgs {
        interval: Duration::from_secs(7),
        start_time: Some(fleetflow::record::format_micros((late_minute + 1_234) * 1000)),
        ..stack.loadgen_args(500, 50, 99)
    };
    fleetflow::loadgen::produce(&args, &std::sync::atomic::AtomicBool::new(false)).unwrap();
    let mut third = Job::start(&stack, "late", 1, 2, &["--exit-when-idle", "2s"]);
    third.wait_success(Duration::from_secs(120));
    assert_eq!(db.metric_rows(), 40_500);
    assert_eq!(db.scalar(ROLLUP_MISMATCHES), 0, "metrics_1m differs from the raw rows after late data");
    assert!(db.scalar("SELECT count(*) FROM metrics_1m") >= minutes_before);
    assert_eq!(db.scalar("SELECT sum(count)::bigint FROM metrics_1m"), 40_500);

    // Fleet percentiles against percentile_disc over the raw rows.
    assert!(db.scalar("SELECT count(*) FROM fleet_1m") > 1);
    assert_eq!(db.scalar(FLEET_MISMATCHES), 0, "fleet_1m differs from the independent computation");
}

fn query(stack: &Stack, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetflow"))
        .args(["query", "--database-url", &stack.db.url])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn silent_servers_and_every_query_subcommand_on_known_data() {
    let stack = Stack::start("query", 2);
    let now = fleetflow::record::now_ms();
    let mut records: Vec<(String, i64, f64)> = Vec::new();
    for (server, cpu) in [("hot", 90.0), ("warm", 50.0), ("cool", 10.0)] {
        for k in 0..3 {
            records.push((server.into(), now - 5_000 - k * 10_000, cpu));
        }
    }
    records.push(("quiet".into(), now - 300_000, 20.0));
    records.push(("gone".into(), now - 2 * 3_600_000, 20.0));
    let producer = fleetflow::kafka::producer::producer(
        &stack.broker.kafka(&stack.topic).into(),
        fleetflow::loadgen::ArcContext(Default::default()),
    )
    .unwrap();
    for (server, ts, cpu) in &records {
        let body = format!(r#"{{"serverId":"{server}","cpu":{cpu},"ram":40,"ts":{ts}}}"#);
        producer.send(BaseRecord::to(&stack.topic).key(server).payload(&body)).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let mut job = Job::start(&stack, "job", 1, 1, &["--exit-when-idle", "1s", "--silent-after", "30s"]);
    job.wait_success(Duration::from_secs(60));

    let (code, out, err) = query(&stack, &["silent", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let silent: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = silent.as_array().unwrap().iter().map(|r| r["server_id"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["quiet"], "{out}");

    let (code, out, err) =
        query(&stack, &["top", "--metric", "cpu", "--window", "10m", "--limit", "2", "--format", "csv"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "server_id,cpu_avg,cpu_max,reports\nhot,90.00,90.00,3\nwarm,50.00,50.00,3\n");

    let (code, out, err) = query(&stack, &["top", "--metric", "ram", "--window", "10m"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().next().unwrap().contains("ram_avg"), "{out}");
    assert_eq!(out.lines().count(), 1 + 4, "header + hot, warm, cool, quiet:\n{out}");

    let (code, out, err) = query(&stack, &["server", "hot", "--since", "1h", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let series: serde_json::Value = serde_json::from_str(&out).unwrap();
    let reports: i64 = series.as_array().unwrap().iter().map(|r| r["reports"].as_i64().unwrap()).sum();
    assert_eq!(reports, 3, "{out}");

    let (code, out, err) = query(&stack, &["fleet", "--since", "1h"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cpu_p95") && out.lines().count() >= 2, "{out}");

    // A reader that goes away (`| head`) ends the command quietly, not with a panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetflow"))
        .args(["query", "--database-url", &stack.db.url, "fleet", "--since", "1h"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{:?}: {err}", out.status);

    // The database URL may also follow the subcommand; a database without the rollups says so.
    let empty = common::Database::create("query_empty");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetflow"))
        .args(["query", "top", "--database-url", &empty.url])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "fleetflow: no fleetflow rollups in this database (has the job run against it?)");

    let (code, _, err) = query(&stack, &["server", "nobody"]);
    assert_eq!(code, 1);
    assert_eq!(err.trim(), "fleetflow: server \"nobody\" has no data in the last 1h");
    let (code, _, err) = query(&stack, &["top", "--metric", "disk"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("disk"), "{err}");
    let (code, _, err) = query(&stack, &["top", "--window", "soon"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("soon"), "{err}");
}

/// metrics_1m, every column (NULL as nothing), in a fixed order.
const ALL_MINUTES: &str = "
SELECT coalesce(string_agg(format('%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s', server_id, bucket, count, last_time,
           cpu_count, round(cpu_sum::numeric, 6), cpu_min, cpu_max, ram_count, round(ram_sum::numeric, 6), ram_min,
           ram_max, round(cpu_avg::numeric, 6), round(ram_avg::numeric, 6)), ';' ORDER BY server_id, bucket), '')
FROM metrics_1m";

#[test]
fn parts_of_a_minute_from_several_transactions_add_up_and_a_metric_never_seen_stays_null() {
    use fleetflow::record::Metric;
    use fleetflow::sink::rollups::RollupDelta;

    let db = common::Database::create("rollup_parts");
    let minute = 1_700_000_040_000_000_i64; // a minute boundary, in microseconds
    let metric = |server: &str, seconds: i64, cpu: Option<f64>, ram: Option<f64>| Metric {
        server_id: server.into(),
        time_us: minute + seconds * 1_000_000,
        cpu,
        ram,
        extra: Default::default(),
    };
    // Three transactions' worth of rows: the same minutes again, a value missing, a new minute.
    let writes = [
        vec![metric("a", 1, Some(10.0), Some(50.0)), metric("b", 2, Some(99.5), None)],
        vec![metric("a", 30, Some(5.0), None), metric("a", 61, Some(1.0), Some(2.0)), metric("b", 3, None, None)],
        vec![metric("a", 59, Some(70.0), Some(40.0)), metric("c", 0, Some(0.0), Some(0.0))],
    ];
    common::runtime().block_on(async {
        let mut client = fleetflow::sink::connect(&db.url).await.unwrap();
        fleetflow::sink::schema::migrate(&mut client, &db.url).await.unwrap();
        for rows in &writes {
            let mut delta = RollupDelta::default();
            rows.iter().for_each(|m| delta.add(m));
            let tx = client.transaction().await.unwrap();
            delta.apply(&tx, 0).await.unwrap();
            tx.commit().await.unwrap();
        }
        // Computed by hand from the rows (b never had a ram value: NULL, not 0).
        let expected = "a,2023-11-14 22:14:00+00,3,2023-11-14 22:14:59+00,3,85.000000,5,70,2,90.000000,40,50,28.333333,45.000000;\
                        a,2023-11-14 22:15:00+00,1,2023-11-14 22:15:01+00,1,1.000000,1,1,1,2.000000,2,2,1.000000,2.000000;\
                        b,2023-11-14 22:14:00+00,2,2023-11-14 22:14:03+00,1,99.500000,99.5,99.5,,,,,99.500000,;\
                        c,2023-11-14 22:14:00+00,1,2023-11-14 22:14:00+00,1,0.000000,0,0,1,0.000000,0,0,0.000000,0.000000";
        assert_eq!(select(&client, ALL_MINUTES).await, expected);
        assert_eq!(
            select(&client, "SELECT string_agg(servers || '/' || reports, ',' ORDER BY bucket) FROM fleet_1m").await,
            "3/6,1/1"
        );
    });
}

async fn select(client: &tokio_postgres::Client, sql: &str) -> String {
    client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get::<_, String>(0)
}
