//! `fleetflow bench`: the job measured against its ceilings, in one run, on the same data.
//!
//! 1. Kafka ceiling: the job's own partition reader draining the topic, without decoding
//!    (the better of two passes).
//! 2. Database ceiling: binary COPY of the same rows into a fresh `metrics` hypertable,
//!    no Kafka in the path.
//! 3. The job, exactly-once on, for each shape (processes x workers): rows/s, the ratio to
//!    min(ceiling 1, ceiling 2), CPU seconds per million records, peak RSS per process;
//!    plus runs with `--dedup natural-key` and with `--rollups false`, for their cost.
//! 4. Steady state: the loadgen at a fixed fraction of the best job rate, and the job's
//!    produce-to-durable latency (p50/p99).
//!
//! Figures are printed as a table and written as JSON. Absolute rates on a shared 2-core
//! machine are noisy; the ratios, measured in the same run, are what to compare.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::cli::{BenchArgs, KafkaArgs, LoadgenArgs};
use crate::envelope::Envelope;
use crate::kafka::consumer::{PartitionReader, Polled, StartOffset};
use crate::machine::CpuSample;
use crate::record::{decode, now_ms, Limits};
use crate::report::RunSummary;

#[derive(Debug, Serialize)]
pub struct JobRun {
    pub shape: String,
    pub flags: String,
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
    pub ratio_to_ceiling: f64,
    pub cpu_seconds_per_million: f64,
    /// CPU seconds per million rows of the database server and of the broker during the
    /// run (from /proc: `machine`), and the share of all cores that was busy.
    pub database_cpu_seconds_per_million: f64,
    pub broker_cpu_seconds_per_million: f64,
    pub machine_utilisation: f64,
    pub peak_rss_mib_per_process: Vec<f64>,
}

/// The job (1x2) on a stream of only malformed records, all dead-lettered.
#[derive(Debug, Serialize)]
pub struct BadOnlyRun {
    pub records: u64,
    pub seconds: f64,
    pub dead_letters_per_second: f64,
    /// Against the 1x2 run on good records, when the shapes include 1x2.
    pub ratio_to_good_1x2: Option<f64>,
    pub cpu_seconds_per_million: f64,
}

/// The job (1x2) flooded with messages at and over `--max-message-bytes`: its peak memory
/// against the bound its settings give.
#[derive(Debug, Serialize)]
pub struct BigMessagesRun {
    pub messages: u64,
    pub message_bytes: usize,
    pub seconds: f64,
    pub megabytes_per_second: f64,
    pub peak_rss_mib: f64,
    /// --max-bytes-in-flight + per worker librdkafka's prefetch queue and fetch buffer
    /// + the resident size of the same job on an empty topic.
    pub bound_mib: f64,
}

/// The same records (recent timestamps, so the rules' windows hold them) through 1x1
/// without rules and with [`BENCH_RULES`]: what evaluating alerts costs.
#[derive(Debug, Serialize)]
pub struct AlertCostRun {
    pub records: u64,
    pub rules: usize,
    pub without_rows_per_second: f64,
    pub with_rows_per_second: f64,
    pub without_cpu_seconds_per_million: f64,
    pub with_cpu_seconds_per_million: f64,
    pub without_peak_rss_mib: f64,
    pub with_peak_rss_mib: f64,
    /// Alerts the rules raised over the records.
    pub alerts: i64,
}

/// Ten rules of every kind, for the alert-cost run.
pub const BENCH_RULES: &str = r#"
[[alert]]
name = "cpu-hot"
metric = "cpu"
above = 90.0
for = "3m"
[[alert]]
name = "cpu-spike"
metric = "cpu"
aggregate = "max"
above = 99.0
for = "1m"
[[alert]]
name = "cpu-pinned"
metric = "cpu"
aggregate = "min"
above = 80.0
for = "10m"
[[alert]]
name = "cpu-idle"
metric = "cpu"
below = 1.0
for = "5m"
[[alert]]
name = "ram-high"
metric = "ram"
above = 90.0
for = "5m"
[[alert]]
name = "ram-low"
metric = "ram"
aggregate = "min"
below = 5.0
for = "2m"
[[alert]]
name = "fleet-cpu-p95"
metric = "cpu"
fleet = "p95"
above = 95.0
for = "3m"
[[alert]]
name = "fleet-ram-avg"
metric = "ram"
fleet = "avg"
above = 80.0
for = "5m"
[[alert]]
name = "server-silent"
silent_for = "30s"
[[alert]]
name = "server-gone"
silent_for = "5m"
"#;

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub records: u64,
    pub servers: u32,
    pub produce_records_per_second: f64,
    pub kafka_ceiling_records_per_second: f64,
    pub database_ceiling_rows_per_second: f64,
    pub database_ceiling_connections: usize,
    /// The database server's CPU seconds per million rows of the bare COPY ceiling.
    pub database_ceiling_cpu_seconds_per_million: f64,
    pub consumer_settings: Vec<(String, String)>,
    pub jobs: Vec<JobRun>,
    pub bad_only: BadOnlyRun,
    pub big: BigMessagesRun,
    pub alerts: AlertCostRun,
    /// The shape of the steady-state run: the one with the best rate.
    pub steady_shape: String,
    pub steady_rate_records_per_second: f64,
    pub latency_p50_ms: u64,
    pub latency_p99_ms: u64,
}

/// Runs the benchmark against the brokers and database server in `args`.
pub fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let stamp = now_ms();
    let kafka = KafkaArgs { topic: format!("{}_{stamp}", args.kafka.topic), ..args.kafka.clone() };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(crate::kafka::admin::create_topic(&kafka.clone().into(), 4, 1))?;

    let start_time = crate::record::format_micros((now_ms() - 86_400_000) * 1000);
    let loadgen = |kafka: KafkaArgs, count: u64, rate: Option<f64>, start_time: Option<String>| LoadgenArgs {
        rate,
        start_time,
        ..LoadgenArgs::straight_to_kafka(kafka, args.servers, count, 1)
    };
    eprintln!("bench: producing {} records to {}", args.records, kafka.topic);
    let produced = crate::loadgen::produce(
        &loadgen(kafka.clone(), args.records, None, Some(start_time.clone())),
        &AtomicBool::new(false),
    )?;
    if produced.failed > 0 {
        bail!("{} records were not acknowledged", produced.failed);
    }

    eprintln!("bench: Kafka ceiling");
    // A fresh reader's first fetches vary a lot against a broker that shares two cores with
    // everything else; the better of two passes is the steadier ceiling.
    let kafka_ceiling = kafka_ceiling(&kafka, args.records)?.max(kafka_ceiling(&kafka, args.records)?);
    eprintln!("bench: database ceiling");
    let rows = same_rows(&loadgen(kafka.clone(), args.records, None, Some(start_time)));
    let ceiling_db = fresh_database(&runtime, &args.database.database_url, &format!("bench_ceiling_{stamp}"))?;
    let ceiling_rows = rows.len() as f64;
    let before = CpuSample::now();
    let db_ceiling = runtime.block_on(database_ceiling(&ceiling_db, rows, args.db_connections))?;
    let ceiling_cpu = CpuSample::now().since(&before).database / (ceiling_rows / 1e6).max(1e-9);
    let ceiling = kafka_ceiling.min(db_ceiling);

    let mut jobs = Vec::new();
    let mut runs: Vec<(String, Vec<&str>)> = args.shapes.iter().map(|s| (s.clone(), vec![])).collect();
    if args.dedup_run {
        runs.push(("2x2".into(), vec!["--dedup", "natural-key"]));
        runs.push(("2x2".into(), vec!["--rollups", "false"]));
    }
    for (shape, flags) in runs {
        eprintln!("bench: job {shape} {}", flags.join(" "));
        let db = fresh_database(&runtime, &args.database.database_url, &format!("bench_job_{}_{stamp}", jobs.len()))?;
        let mut extra = vec!["--exit-when-idle", "1s"];
        extra.extend(&flags);
        let before = CpuSample::now();
        let finished = run_job(&kafka, &db, &shape, &extra, None)?;
        let used = CpuSample::now().since(&before);
        let rows: u64 = finished.iter().map(|f| f.rows_written).sum();
        if rows != args.records {
            bail!("job {shape} wrote {rows} rows, expected {}", args.records);
        }
        let seconds = finished.iter().map(|f| f.active_seconds).fold(0.0, f64::max);
        let rate = rows as f64 / seconds.max(1e-9);
        jobs.push(JobRun {
            shape,
            flags: flags.join(" "),
            rows,
            seconds,
            rows_per_second: rate,
            ratio_to_ceiling: rate / ceiling,
            cpu_seconds_per_million: finished.iter().map(|f| f.cpu_seconds.unwrap_or(0.0)).sum::<f64>()
                / (rows as f64 / 1e6),
            database_cpu_seconds_per_million: used.database / (rows as f64 / 1e6),
            broker_cpu_seconds_per_million: used.broker / (rows as f64 / 1e6),
            machine_utilisation: used.machine_utilisation(),
            peak_rss_mib_per_process: finished.iter().map(|f| f.peak_rss_mib.unwrap_or(0.0)).collect(),
        });
    }

    // A stream of only malformed records: dead letters must not be the bottleneck.
    let bad_count = (args.records / 2).max(1);
    eprintln!("bench: job 1x2 on {bad_count} malformed records");
    let bad_topic = KafkaArgs { topic: format!("{}_bad", kafka.topic), ..kafka.clone() };
    runtime.block_on(crate::kafka::admin::create_topic(&bad_topic.clone().into(), 4, 1))?;
    let bad_loadgen = LoadgenArgs { bad_fraction: 1.0, ..loadgen(bad_topic.clone(), bad_count, None, None) };
    crate::loadgen::produce(&bad_loadgen, &AtomicBool::new(false))?;
    let db = fresh_database(&runtime, &args.database.database_url, &format!("bench_bad_{stamp}"))?;
    let finished = run_job(&bad_topic, &db, "1x2", &["--exit-when-idle", "1s"], None)?;
    let letters: u64 = finished.iter().map(|f| f.dead_letters).sum();
    if letters != bad_count {
        bail!("job 1x2 wrote {letters} dead letters, expected {bad_count}");
    }
    let seconds = finished.iter().map(|f| f.active_seconds).fold(0.0, f64::max);
    let bad_rate = letters as f64 / seconds.max(1e-9);
    let good_1x2 = jobs.iter().find(|j| j.shape == "1x2" && j.flags.is_empty()).map(|j| j.rows_per_second);
    let bad_only = BadOnlyRun {
        records: letters,
        seconds,
        dead_letters_per_second: bad_rate,
        ratio_to_good_1x2: good_1x2.map(|g| bad_rate / g),
        cpu_seconds_per_million: finished.iter().map(|f| f.cpu_seconds.unwrap_or(0.0)).sum::<f64>()
            / (letters as f64 / 1e6),
    };

    // Alert rules: the same recent records with and without them.
    let alert_count = (args.records / 2).max(1);
    eprintln!("bench: job 1x1 on {alert_count} recent records, without and with {} alert rules", rule_count());
    let alert_topic = KafkaArgs { topic: format!("{}_alerts", kafka.topic), ..kafka.clone() };
    runtime.block_on(crate::kafka::admin::create_topic(&alert_topic.clone().into(), 4, 1))?;
    // Ending about now: the rules keep only the last hour.
    let span_ms = (alert_count / u64::from(args.servers.max(1))) as i64 * 10_000;
    let recent = crate::record::format_micros((now_ms() - span_ms) * 1000);
    crate::loadgen::produce(&loadgen(alert_topic.clone(), alert_count, None, Some(recent)), &AtomicBool::new(false))?;
    let rules_file = std::env::temp_dir().join(format!("fleetflow-bench-rules-{}.toml", std::process::id()));
    std::fs::write(&rules_file, BENCH_RULES)?;
    let rules_path = rules_file.display().to_string();
    let mut alert_runs = Vec::new();
    for (i, flags) in [vec![], vec!["--config", rules_path.as_str()]].into_iter().enumerate() {
        let db = fresh_database(&runtime, &args.database.database_url, &format!("bench_alerts_{i}_{stamp}"))?;
        let mut extra = vec!["--exit-when-idle", "1s"];
        extra.extend(flags);
        let finished = run_job(&alert_topic, &db, "1x1", &extra, None)?;
        let rows: u64 = finished.iter().map(|f| f.rows_written).sum();
        if rows != alert_count {
            bail!("job 1x1 wrote {rows} rows of the alert run, expected {alert_count}");
        }
        let alerts = runtime.block_on(async {
            let client = crate::sink::connect(&db).await?;
            let n: i64 = client.query_one("SELECT count(*) FROM alerts", &[]).await?.get(0);
            Ok::<_, anyhow::Error>(n)
        })?;
        let f = &finished[0];
        alert_runs.push((
            rows as f64 / f.active_seconds.max(1e-9),
            f.cpu_seconds.unwrap_or(0.0) / (rows as f64 / 1e6),
            f.peak_rss_mib.unwrap_or(0.0),
            alerts,
        ));
    }
    let _ = std::fs::remove_file(&rules_file);
    let alerts = AlertCostRun {
        records: alert_count,
        rules: rule_count(),
        without_rows_per_second: alert_runs[0].0,
        with_rows_per_second: alert_runs[1].0,
        without_cpu_seconds_per_million: alert_runs[0].1,
        with_cpu_seconds_per_million: alert_runs[1].1,
        without_peak_rss_mib: alert_runs[0].2,
        with_peak_rss_mib: alert_runs[1].2,
        alerts: alert_runs[1].3,
    };

    let big_count = (args.records / 300).clamp(200, 3_000);
    let big = big_messages_run(&runtime, &kafka, &args.database.database_url, stamp, big_count)?;

    let (mut steady_rate, mut p50, mut p99) = (0.0, 0, 0);
    // At a fraction of the best rate, with the shape that reached it.
    let best =
        jobs.iter().filter(|j| j.flags.is_empty()).max_by(|a, b| a.rows_per_second.total_cmp(&b.rows_per_second));
    let steady_shape = best.map_or_else(|| "1x1".to_owned(), |j| j.shape.clone());
    if args.latency_seconds > 0 {
        steady_rate = (best.map_or(0.0, |j| j.rows_per_second) * args.steady_fraction).max(100.0);
        eprintln!("bench: steady state {steady_shape} at {steady_rate:.0} records/s for {} s", args.latency_seconds);
        let steady_topic = KafkaArgs { topic: format!("{}_steady", kafka.topic), ..kafka.clone() };
        runtime.block_on(crate::kafka::admin::create_topic(&steady_topic.clone().into(), 4, 1))?;
        let db = fresh_database(&runtime, &args.database.database_url, &format!("bench_steady_{stamp}"))?;
        let count = (steady_rate * args.latency_seconds as f64) as u64;
        let steady = loadgen(steady_topic.clone(), count, Some(steady_rate), None);
        let finished = run_job(&steady_topic, &db, &steady_shape, &["--epoch-interval", "50ms"], Some(&steady))?;
        p50 = finished.iter().map(|f| f.latency_p50_ms).max().unwrap_or(0);
        p99 = finished.iter().map(|f| f.latency_p99_ms).max().unwrap_or(0);
    }

    Ok(BenchReport {
        records: args.records,
        servers: args.servers,
        produce_records_per_second: produced.sent as f64 / produced.seconds,
        kafka_ceiling_records_per_second: kafka_ceiling,
        database_ceiling_rows_per_second: db_ceiling,
        database_ceiling_connections: args.db_connections,
        database_ceiling_cpu_seconds_per_million: ceiling_cpu,
        consumer_settings: crate::kafka::consumer::consumer_tuning(1)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        jobs,
        bad_only,
        big,
        alerts,
        steady_shape,
        steady_rate_records_per_second: steady_rate,
        latency_p50_ms: p50,
        latency_p99_ms: p99,
    })
}

fn rule_count() -> usize {
    BENCH_RULES.matches("[[alert]]").count()
}

/// The report as an aligned table.
pub fn table(r: &BenchReport) -> String {
    let mut out =
        format!(
        "records {}  servers {}  produce {:.0}/s\nKafka ceiling     {:>10.0} records/s  (one reader, no decoding, best of 2)\n\
         database ceiling  {:>10.0} rows/s     (binary COPY, {} connections, no Kafka; database {:.2} cpu s/M rows)\n\n\
         {:<6} {:<22} {:>11} {:>9} {:>10} {:>10} {:>10} {:>8} {:>7} {:>18}\n",
        r.records, r.servers, r.produce_records_per_second, r.kafka_ceiling_records_per_second,
        r.database_ceiling_rows_per_second, r.database_ceiling_connections, r.database_ceiling_cpu_seconds_per_million,
        "shape", "flags", "rows/s", "ratio", "job s/M", "db s/M", "kafka s/M", "db/COPY", "busy", "peak RSS MiB/proc"
    );
    for j in &r.jobs {
        let rss: Vec<String> = j.peak_rss_mib_per_process.iter().map(|m| format!("{m:.0}")).collect();
        out += &format!(
            "{:<6} {:<22} {:>11.0} {:>8.0}% {:>10.2} {:>10.2} {:>10.2} {:>7.1}x {:>6.0}% {:>18}\n",
            j.shape,
            j.flags,
            j.rows_per_second,
            j.ratio_to_ceiling * 100.0,
            j.cpu_seconds_per_million,
            j.database_cpu_seconds_per_million,
            j.broker_cpu_seconds_per_million,
            j.database_cpu_seconds_per_million / r.database_ceiling_cpu_seconds_per_million.max(1e-9),
            j.machine_utilisation * 100.0,
            rss.join(" ")
        );
    }
    let b = &r.bad_only;
    out += &format!(
        "1x2    only malformed records  {:>11.0} dead letters/s{} {:>10.2} cpu s/M\n",
        b.dead_letters_per_second,
        b.ratio_to_good_1x2.map(|x| format!(", {:.0}% of 1x2 on good records,", x * 100.0)).unwrap_or_default(),
        b.cpu_seconds_per_million
    );
    let g = &r.big;
    out += &format!(
        "1x2    {} messages of {} KiB  {:>8.1} MB/s   peak RSS {:.0} MiB of a {:.0} MiB bound ({:.0}%)\n",
        g.messages,
        g.message_bytes / 1024,
        g.megabytes_per_second,
        g.peak_rss_mib,
        g.bound_mib,
        g.peak_rss_mib / g.bound_mib * 100.0
    );
    let a = &r.alerts;
    out += &format!(
        "1x1    {} recent records, alert rules: none {:.0} rows/s, {:.2} cpu s/M, peak RSS {:.0} MiB; \
         {} rules {:.0} rows/s ({:.0}%), {:.2} cpu s/M, peak RSS {:.0} MiB; {} alerts\n",
        a.records,
        a.without_rows_per_second,
        a.without_cpu_seconds_per_million,
        a.without_peak_rss_mib,
        a.rules,
        a.with_rows_per_second,
        a.with_rows_per_second / a.without_rows_per_second.max(1e-9) * 100.0,
        a.with_cpu_seconds_per_million,
        a.with_peak_rss_mib,
        a.alerts
    );
    if r.steady_rate_records_per_second > 0.0 {
        out += &format!(
            "\nsteady state {} at {:.0} records/s: produce-to-durable latency p50 {} ms, p99 {} ms\n",
            r.steady_shape, r.steady_rate_records_per_second, r.latency_p50_ms, r.latency_p99_ms
        );
    }
    out
}

/// Half the messages are valid records padded to the size limit with an ignored field, half
/// are over it (dead letters, of which 4 KiB are kept).
fn big_messages_run(
    runtime: &tokio::runtime::Runtime,
    kafka: &KafkaArgs,
    server_url: &str,
    stamp: i64,
    messages: u64,
) -> anyhow::Result<BigMessagesRun> {
    use rdkafka::producer::{BaseRecord, Producer};
    let limit = Limits::default().max_bytes;
    let topic = KafkaArgs { topic: format!("{}_big", kafka.topic), ..kafka.clone() };
    runtime.block_on(crate::kafka::admin::create_topic(&topic.clone().into(), 4, 1))?;
    eprintln!("bench: job 1x2 on {messages} messages of about {} KiB", limit / 1024);
    let deliveries = std::sync::Arc::new(crate::loadgen::Deliveries::default());
    let producer =
        crate::kafka::producer::producer(&topic.clone().into(), crate::loadgen::ArcContext(deliveries.clone()))?;
    let mut bytes = 0usize;
    for i in 0..messages {
        let id = format!("big{}", i % 100);
        let size = if i % 2 == 0 { limit } else { limit + 4096 };
        let head = format!(r#"{{"serverId":"{id}","cpu":{},"note":""#, i % 100);
        let body = format!("{head}{}\"}}", "x".repeat(size - head.len() - 2));
        bytes += body.len();
        let mut record = BaseRecord::to(&topic.topic).key(&id).payload(&body);
        while let Err((e, back)) = producer.send(record) {
            if !matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)) {
                bail!("producing the large messages failed: {e}");
            }
            std::thread::sleep(Duration::from_millis(5));
            record = back;
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let empty = KafkaArgs { topic: format!("{}_empty", kafka.topic), ..kafka.clone() };
    runtime.block_on(crate::kafka::admin::create_topic(&empty.clone().into(), 4, 1))?;
    let db = fresh_database(runtime, server_url, &format!("bench_empty_{stamp}"))?;
    let idle = run_job(&empty, &db, "1x2", &["--exit-when-idle", "1s"], None)?;
    let baseline = idle.iter().map(|f| f.peak_rss_mib.unwrap_or(0.0)).fold(0.0, f64::max);
    let db = fresh_database(runtime, server_url, &format!("bench_big_{stamp}"))?;
    let finished = run_job(&topic, &db, "1x2", &["--exit-when-idle", "1s"], None)?;
    let handled: u64 = finished.iter().map(|f| f.rows_written + f.dead_letters).sum();
    if handled != messages {
        bail!("job 1x2 handled {handled} of {messages} large messages");
    }
    let seconds = finished.iter().map(|f| f.active_seconds).fold(0.0, f64::max);
    // The 1x2 job's two consumers share the process's budget.
    let tuning = crate::kafka::consumer::consumer_tuning(2);
    let kib = |key: &str| tuning.iter().find(|(k, _)| *k == key).and_then(|(_, v)| v.parse::<f64>().ok());
    let per_worker_mib = kib("queued.max.messages.kbytes").unwrap_or(65536.0) / 1024.0
        + kib("fetch.max.bytes").unwrap_or(52_428_800.0) / 1048576.0;
    let defaults = crate::cli::RunArgs::default_max_bytes_in_flight() as f64 / 1048576.0;
    Ok(BigMessagesRun {
        messages,
        message_bytes: limit,
        seconds,
        megabytes_per_second: bytes as f64 / 1e6 / seconds.max(1e-9),
        peak_rss_mib: finished.iter().map(|f| f.peak_rss_mib.unwrap_or(0.0)).fold(0.0, f64::max),
        bound_mib: baseline + defaults + 2.0 * per_worker_mib,
    })
}

fn kafka_ceiling(kafka: &KafkaArgs, expected: u64) -> anyhow::Result<f64> {
    let starts: Vec<(i32, StartOffset)> = (0..4).map(|p| (p, StartOffset::Earliest)).collect();
    let mut reader = PartitionReader::open(&kafka.clone().into(), "fleetflow-bench", 1, &starts)?;
    let started = Instant::now();
    let mut read = 0u64;
    while read < expected {
        match reader.poll() {
            Polled::Message(_) => read += 1,
            Polled::Nothing => std::thread::sleep(Duration::from_micros(100)),
            Polled::Error(e) => tracing::warn!(error = %e, "Kafka error during the ceiling run"),
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the Kafka ceiling run read only {read} of {expected} records in 10 minutes");
        }
    }
    Ok(read as f64 / started.elapsed().as_secs_f64())
}

/// The rows the job would write for the loadgen's records, decoded up front.
fn same_rows(args: &LoadgenArgs) -> Vec<Envelope> {
    let start_ms = chrono::DateTime::parse_from_rfc3339(args.start_time.as_deref().unwrap_or_default())
        .map(|t| t.timestamp_millis())
        .unwrap_or_else(|_| now_ms());
    let mut fleet = crate::loadgen::Fleet::new(args.servers, args.interval, start_ms, args.seed, 0.0);
    let now = now_ms();
    (0..args.count.unwrap_or(0) as i64)
        .map(|offset| {
            let (key, payload) = fleet.next_record();
            let decoded = decode(payload.as_bytes(), Some(key.as_bytes()), None, now, &Limits::default());
            Envelope::new(0, offset, Some(key.as_bytes()), payload.as_bytes(), None, decoded)
        })
        .collect()
}

async fn database_ceiling(url: &str, rows: Vec<Envelope>, connections: usize) -> anyhow::Result<f64> {
    let total = rows.len();
    let connections = connections.max(1);
    let chunk = total.div_ceil(connections).max(1);
    let mut parts = Vec::new();
    let mut rest = rows;
    while rest.len() > chunk {
        let tail = rest.split_off(chunk);
        parts.push(std::mem::replace(&mut rest, tail));
    }
    parts.push(rest);
    let mut clients = Vec::new();
    for _ in 0..parts.len() {
        clients.push(crate::sink::connect(url).await?);
    }
    let started = Instant::now();
    let writes = clients.iter_mut().zip(&parts).map(|(client, part)| crate::sink::copy::copy_rows(client, part));
    for result in futures_util::future::join_all(writes).await {
        result?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Creates an empty database with the fleetflow schema next to `server_url`'s database.
fn fresh_database(runtime: &tokio::runtime::Runtime, server_url: &str, name: &str) -> anyhow::Result<ScratchDatabase> {
    let url = match server_url.rsplit_once('/') {
        Some((base, db)) if !base.ends_with('/') => {
            format!("{base}/{name}{}", db.find('?').map(|i| &db[i..]).unwrap_or(""))
        }
        _ => bail!("cannot derive a database URL from {server_url}"),
    };
    runtime.block_on(async {
        let admin = crate::sink::connect(server_url).await?;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await?;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    // From here on the database is dropped again whatever happens.
    let scratch = ScratchDatabase {
        runtime: runtime.handle().clone(),
        server_url: server_url.to_owned(),
        name: name.to_owned(),
        url,
    };
    runtime.block_on(async {
        let mut client = crate::sink::connect(&scratch.url).await?;
        crate::sink::schema::migrate(&mut client, &scratch.url).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(scratch)
}

/// A database the bench made for one measurement, dropped as soon as the measurement is done.
/// A run fills about a dozen of them with up to a million rows each, a gigabyte in all: left
/// behind, repeated runs filled this machine's disk.
struct ScratchDatabase {
    runtime: tokio::runtime::Handle,
    server_url: String,
    name: String,
    url: String,
}

impl std::ops::Deref for ScratchDatabase {
    type Target = str;
    fn deref(&self) -> &str {
        &self.url
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        // A handle's block_on drives no tasks of its own: this relies on the bench's runtime
        // being multi-threaded, so the connection's task runs on its workers.
        let dropped = self.runtime.block_on(async {
            let admin = crate::sink::connect(&self.server_url).await?;
            admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await?;
            Ok::<_, anyhow::Error>(())
        });
        if let Err(e) = dropped {
            eprintln!("bench: could not drop the database {} ({e:#}); drop it by hand", self.name);
        }
    }
}

/// Waits until the processes' logs say `workers` workers started reading (connected,
/// fenced, topic checked); fails if a process exits first or a minute passes.
fn wait_for_workers(children: &mut [(std::process::Child, PathBuf, PathBuf)], workers: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let started: usize = children
            .iter()
            .map(|(_, log, _)| std::fs::read_to_string(log).unwrap_or_default().matches("worker starting").count())
            .sum();
        if started >= workers {
            return Ok(());
        }
        for (child, log, _) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("job process exited ({status}) before its workers started; see {}", log.display());
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("the job's {workers} workers did not all start within a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the job as `shape` ("PxW") and returns each process's final summary
/// (`--summary-json`). With `steady`, the loadgen runs alongside and the job is stopped with
/// SIGTERM after it.
fn run_job(
    kafka: &KafkaArgs,
    db: &str,
    shape: &str,
    extra: &[&str],
    steady: Option<&LoadgenArgs>,
) -> anyhow::Result<Vec<RunSummary>> {
    let (processes, workers) = shape.split_once('x').context("a shape is PROCESSESxWORKERS, e.g. 2x2")?;
    let (processes, workers): (usize, usize) = (processes.parse()?, workers.parse()?);
    let exe = std::env::current_exe()?;
    let hosts: Vec<String> = (0..processes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    let dir = std::env::temp_dir().join(format!("fleetflow-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut children = Vec::new();
    for p in 0..processes {
        let log: PathBuf = dir.join(format!("{shape}-{p}.log"));
        let file = std::fs::File::create(&log)?;
        let summary = dir.join(format!("{shape}-{p}.summary.json"));
        // The job replaces it at start; gone meanwhile, it cannot pass for this run's.
        let _ = std::fs::remove_file(&summary);
        let mut cmd = Command::new(&exe);
        cmd.args(["run", "--brokers", &kafka.brokers, "--topic", &kafka.topic, "--database-url", db])
            .args([
                "--workers",
                &workers.to_string(),
                "--processes",
                &processes.to_string(),
                "--process-id",
                &p.to_string(),
            ])
            .args(["--group", &format!("bench-{}", kafka.topic)])
            .arg("--summary-json")
            .arg(&summary)
            .args(extra)
            .env("FLEETFLOW_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        if processes > 1 {
            cmd.args(["--hosts", &hosts.join(",")]);
        }
        children.push((cmd.spawn()?, log, summary));
    }
    if let Some(loadgen) = steady {
        // Steady state, not start-up: produce once every worker has started reading.
        if let Err(e) = wait_for_workers(&mut children, processes * workers) {
            for (child, _, _) in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(e);
        }
        crate::loadgen::produce(loadgen, &AtomicBool::new(false))?;
        std::thread::sleep(Duration::from_secs(2));
        for (child, _, _) in &children {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
    }
    let mut finished = Vec::new();
    for (mut child, log, summary) in children {
        let status = child.wait()?;
        match RunSummary::read(&summary) {
            Ok(s) if status.success() && s.finished && s.exit_code == Some(0) => finished.push(s),
            read => bail!(
                "job {shape} process exited ({status}) without finishing{}; see {}",
                read.err().map(|e| format!(" ({e})")).unwrap_or_default(),
                log.display()
            ),
        }
    }
    Ok(finished)
}
