//! Operations commands: `status` (where the job stands), `check` (is this configuration
//! usable), `retention` (drop old raw data).

use std::time::Duration;

use anyhow::Context;

use crate::cli::{RetentionArgs, RunArgs, StatusArgs};
use crate::sink::{connect, describe_target};

/// `fleetflow status`: committed offsets, lag per partition, last commit, dead letters,
/// the newest raw record and how far the rollups have caught up with it.
pub async fn status(args: StatusArgs) -> anyhow::Result<String> {
    let url = &args.database.database_url;
    let client = connect(url).await?;
    let topic = &args.kafka.topic;
    let rows = client
        .query(
            "SELECT partition, next_offset, committed_at, extract(epoch FROM now() - committed_at)::float8
             FROM fleetflow_offsets WHERE topic = $1 ORDER BY partition",
            &[topic],
        )
        .await
        .context("no fleetflow schema in this database (has the job run against it?)")?;
    let kafka = args.kafka.clone();
    let partitions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let ends = tokio::task::spawn_blocking(move || {
        partitions.iter().map(|p| crate::kafka::admin::end_offset(&kafka, *p).ok()).collect::<Vec<_>>()
    })
    .await?;

    let mut out = format!("topic {topic} on {}, database {}\n\n", args.kafka.brokers, describe_target(url));
    out += &format!("{:>9}  {:>12}  {:>12}  {:>10}  {}\n", "partition", "committed", "end", "lag", "last commit");
    let mut total_lag = Some(0i64);
    for (row, end) in rows.iter().zip(&ends) {
        let (partition, next, at, age): (i32, i64, chrono::DateTime<chrono::Utc>, f64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let lag = end.map(|e| (e - next).max(0));
        total_lag = total_lag.zip(lag).map(|(a, b)| a + b);
        out += &format!(
            "{partition:>9}  {next:>12}  {:>12}  {:>10}  {} ({} ago)\n",
            end.map_or("?".into(), |e| e.to_string()),
            lag.map_or("?".into(), |l| l.to_string()),
            at.format("%Y-%m-%d %H:%M:%S UTC"),
            humantime::format_duration(Duration::from_secs(age.max(0.0) as u64)),
        );
    }
    if rows.is_empty() {
        out += "        (nothing committed yet)\n";
    }
    out += &format!(
        "\ntotal lag: {}\n",
        total_lag.map_or("unknown (Kafka unreachable)".into(), |l| format!("{l} messages"))
    );
    let dead = client
        .query(
            "SELECT kind, count(*) FROM fleetflow_dead_letters WHERE topic = $1 GROUP BY kind ORDER BY 2 DESC",
            &[topic],
        )
        .await?;
    let total: i64 = dead.iter().map(|r| r.get::<_, i64>(1)).sum();
    let kinds: Vec<String> = dead.iter().map(|r| format!("{} {}", r.get::<_, String>(0), r.get::<_, i64>(1))).collect();
    out += &format!(
        "dead letters: {total}{}\n",
        if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join(", ")) }
    );
    let approx: i64 = client.query_one("SELECT approximate_row_count('metrics')", &[]).await?.get(0);
    let newest: Option<chrono::DateTime<chrono::Utc>> =
        client.query_one("SELECT max(time) FROM metrics", &[]).await?.get(0);
    out += &format!(
        "metrics: about {approx} rows, newest record {}\n",
        newest.map_or("none".into(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
    );
    // The rollups commit with the raw rows, so they trail them only when a job ran with
    // --rollups false.
    let rolled_up: Option<chrono::DateTime<chrono::Utc>> = client
        .query_one("SELECT max(last_time) FROM metrics_1m WHERE bucket = (SELECT max(bucket) FROM metrics_1m)", &[])
        .await?
        .get(0);
    out += &format!(
        "rollups: newest record summarised {}{}\n",
        rolled_up.map_or("none".into(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
        match (newest, rolled_up) {
            (Some(raw), Some(rolled)) if raw > rolled => format!(
                ", {} behind the raw rows",
                humantime::format_duration(Duration::from_secs((raw - rolled).num_seconds().max(0) as u64))
            ),
            (Some(_), Some(_)) => " (up to date with the raw rows)".into(),
            _ => String::new(),
        }
    );
    Ok(out)
}

/// `fleetflow check`: each line says what was checked and how it went. Returns the report
/// and whether everything passed.
pub async fn check(args: RunArgs) -> (String, bool) {
    let mut out = String::new();
    let mut ok = true;
    let mut line = |passed: bool, what: String| {
        ok &= passed;
        out += &format!("{} {what}\n", if passed { "ok  " } else { "FAIL" });
    };
    match crate::config::timely_config(&args) {
        Ok(_) => line(
            true,
            format!(
                "config: {} process(es) x {} worker(s), this is process {}, topic {}, epochs of {} records / {}",
                args.processes,
                args.workers,
                args.process_id,
                args.kafka.topic,
                args.epoch_records,
                humantime::format_duration(args.epoch_interval)
            ),
        ),
        Err(e) => line(false, format!("config: {e}")),
    }
    let kafka = args.kafka.clone();
    match tokio::task::spawn_blocking(move || crate::kafka::admin::partition_count(&kafka)).await {
        Ok(Ok(n)) => {
            line(true, format!("kafka: reachable at {}", args.kafka.brokers));
            line(true, format!("topic {}: {n} partitions", args.kafka.topic));
        }
        Ok(Err(e)) => line(false, format!("kafka: {e}")),
        Err(e) => line(false, format!("kafka: {e}")),
    }
    let url = &args.database.database_url;
    match connect(url).await {
        Err(e) => line(false, format!("database: {e}")),
        Ok(client) => {
            line(true, format!("database: reachable at {}", describe_target(url)));
            let ext = client
                .query_opt(
                    "SELECT coalesce((SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'),
                                     (SELECT default_version || ' (available, not yet enabled)' FROM pg_available_extensions WHERE name = 'timescaledb'))",
                    &[],
                )
                .await
                .ok()
                .flatten()
                .and_then(|r| r.get::<_, Option<String>>(0));
            match ext {
                Some(v) => line(true, format!("timescaledb: {v}")),
                None => line(false, "timescaledb: not installed on this server".into()),
            }
            let known = crate::sink::schema::latest_version();
            let version = client
                .query_opt("SELECT max(version) FROM fleetflow_schema_version", &[])
                .await
                .ok()
                .flatten()
                .and_then(|r| r.get::<_, Option<i32>>(0));
            match version {
                None => line(true, format!("schema: not created yet (the job creates version {known} on start)")),
                Some(v) if v <= known => line(true, format!("schema: version {v} (this fleetflow knows {known})")),
                Some(v) => line(
                    false,
                    format!("schema: version {v} is newer than this fleetflow ({known}); upgrade fleetflow"),
                ),
            }
        }
    }
    (out, ok)
}

/// Drops raw chunks older than `older_than`; returns how many.
pub async fn drop_old_chunks(url: &str, older_than: Duration) -> anyhow::Result<usize> {
    let client = connect(url).await?;
    let interval = format!("{} seconds", older_than.as_secs());
    let rows = client
        .query("SELECT drop_chunks('metrics', older_than => now() - $1::text::interval)", &[&interval])
        .await
        .context("drop_chunks on metrics failed")?;
    Ok(rows.len())
}

/// `fleetflow retention --older-than`.
pub async fn retention(args: RetentionArgs) -> anyhow::Result<String> {
    let dropped = drop_old_chunks(&args.database.database_url, args.older_than).await?;
    Ok(format!("dropped {dropped} chunk(s) of metrics older than {}", humantime::format_duration(args.older_than)))
}
