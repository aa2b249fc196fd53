//! Operations commands: `status` (where the job stands), `check` (is this configuration
//! usable), `retention` (drop old raw data).

use std::collections::{BTreeMap, BTreeSet};
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
    let kafka = crate::config::KafkaConfig::from(args.kafka.clone());
    let committed: BTreeMap<i32, (i64, chrono::DateTime<chrono::Utc>, f64)> =
        rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3)))).collect();
    // Every partition the topic has now (added ones included) and every one with an offset.
    let known: Vec<i32> = committed.keys().copied().collect();
    let (count, marks) = tokio::task::spawn_blocking(move || {
        let count = crate::kafka::admin::partition_count(&kafka).ok();
        let mut partitions: BTreeSet<i32> = known.into_iter().collect();
        partitions.extend(0..count.unwrap_or(0));
        let partitions: Vec<i32> = partitions.into_iter().collect();
        // One client for all partitions; a partition that does not answer shows "?".
        let marks: BTreeMap<i32, Option<(i64, i64)>> = match crate::kafka::admin::watermarks_each(&kafka, &partitions) {
            Ok(each) => each.into_iter().map(|(p, marks)| (p, marks.ok())).collect(),
            Err(_) => partitions.iter().map(|p| (*p, None)).collect(),
        };
        (count, marks)
    })
    .await?;
    // Partition events (schema 4; absent from a database the job has not migrated yet).
    let skipped = crate::sink::events::skipped(&client, topic).await.unwrap_or_default();
    let events = crate::sink::events::recent(&client, topic, 10).await.unwrap_or_default();

    let mut out = format!("topic {topic} on {}, database {}\n", args.kafka.brokers, describe_target(url));
    // Which job holds the topic (see sink::fence), and whether it is running now.
    let holder = client
        .query_opt(
            "SELECT j.generation, j.holder, to_char(j.started_at, 'YYYY-MM-DD HH24:MI:SS TZ'),
                    EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted
                            AND l.classid = $2 AND l.objid = hashtext($1)::oid AND l.objsubid = 2
                            -- advisory locks are per database: a job on the same topic
                            -- name in another database of the server is not this one
                            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
             FROM fleetflow_jobs j WHERE j.topic = $1",
            &[topic, &(crate::sink::fence::LOCK_CLASS as u32)],
        )
        .await
        .ok()
        .flatten();
    out += &match holder {
        Some(r) => format!(
            "held by: {} (generation {}, started {}){}\n\n",
            r.get::<_, String>(1),
            r.get::<_, i64>(0),
            r.get::<_, String>(2),
            if r.get::<_, bool>(3) { ", running" } else { ", not running now" }
        ),
        None => "held by: no job yet\n\n".into(),
    };
    out += &format!(
        "{:>9}  {:>12}  {:>12}  {:>12}  {:>10}  {:>10}  {}\n",
        "partition", "start", "committed", "end", "lag", "skipped", "last commit"
    );
    let mut total_lag = Some(0i64);
    let mut notes = Vec::new();
    for (partition, mark) in &marks {
        let line = partition_line(*partition, committed.get(partition), *mark, count);
        total_lag = total_lag.zip(line.lag).map(|(a, b)| a + b);
        notes.extend(line.note);
        let last = committed.get(partition).map_or("-".into(), |(_, at, age)| {
            format!(
                "{} ({} ago)",
                at.format("%Y-%m-%d %H:%M:%S UTC"),
                humantime::format_duration(Duration::from_secs(age.max(0.0) as u64))
            )
        });
        let show = |v: Option<i64>| v.map_or("?".to_owned(), |v| v.to_string());
        out += &format!(
            "{partition:>9}  {:>12}  {:>12}  {:>12}  {:>10}  {:>10}  {last}\n",
            show(mark.map(|m| m.0)),
            committed.get(partition).map_or("-".to_owned(), |c| c.0.to_string()),
            show(mark.map(|m| m.1)),
            show(line.lag),
            skipped.get(partition).copied().unwrap_or(0),
        );
    }
    if committed.is_empty() {
        out += "        (nothing committed yet)\n";
    }
    out += &format!(
        "\ntotal lag: {}\n",
        match total_lag {
            Some(l) => format!("{l} messages"),
            None if marks.values().any(Option::is_none) => "unknown (Kafka unreachable)".into(),
            None => "unknown (see the notes)".into(),
        }
    );
    for note in notes {
        out += &format!("note: {note}\n");
    }
    if !events.is_empty() {
        out += "partition events (newest first):\n";
        for e in &events {
            let range = e.range.map_or(String::new(), |(from, to)| format!(" offsets {from}..{to}"));
            out += &format!(
                "  {}  partition {}  {}{range}: {}\n",
                e.at.format("%Y-%m-%d %H:%M:%S UTC"),
                e.partition,
                e.kind,
                e.detail
            );
        }
    }
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
    match crate::config::JobConfig::from_args(args.clone()) {
        Ok(config) => line(
            true,
            format!(
                "config: {} process(es) x {} worker(s), this is process {}, topic {}, epochs of {} records / {}",
                config.cluster.processes,
                config.cluster.workers,
                config.cluster.process_id,
                config.kafka.topic,
                config.epochs.records,
                humantime::format_duration(config.epochs.interval)
            ),
        ),
        Err(e) => line(false, format!("config: {e}")),
    }
    let kafka = crate::config::KafkaConfig::from(args.kafka.clone());
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

/// One partition's row in `status`: its lag and what an operator should know about it.
#[derive(Debug, PartialEq, Eq)]
struct PartitionLine {
    lag: Option<i64>,
    note: Option<String>,
}

/// Compares a partition's committed offset (if any) with its watermarks (if Kafka answered)
/// and the topic's partition count now.
fn partition_line(
    partition: i32,
    committed: Option<&(i64, chrono::DateTime<chrono::Utc>, f64)>,
    marks: Option<(i64, i64)>,
    count: Option<i32>,
) -> PartitionLine {
    use crate::kafka::watch::{check_start, StartCheck};
    let Some((low, high)) = marks else {
        let note = count.filter(|c| partition >= *c).map(|c| {
            format!("partition {partition} has committed offsets but the topic has only {c} partitions now (recreated?); the job refuses to start (see --on-topic-reset)")
        });
        return PartitionLine { lag: None, note };
    };
    match committed.map(|c| c.0) {
        None => PartitionLine {
            lag: Some(high - low),
            note: Some(format!("partition {partition} has no committed offset yet (new, or added to the topic): the job reads it from its earliest offset {low}")),
        },
        Some(next) => match check_start(next, low, high) {
            StartCheck::Fine => PartitionLine { lag: Some(high - next), note: None },
            StartCheck::Gap { from, to } => PartitionLine {
                lag: Some(high - low),
                note: Some(format!("partition {partition}: retention deleted offsets {from} to {} ({} messages) before the job read them; the job skips them and counts them", to - 1, to - from)),
            },
            StartCheck::BeyondEnd { committed, end } => PartitionLine {
                lag: None,
                note: Some(format!("partition {partition} ends at {end}, below the committed offset {committed}: the topic was deleted and recreated, or truncated; the job refuses to start until run with --on-topic-reset start-over")),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(next: i64) -> (i64, chrono::DateTime<chrono::Utc>, f64) {
        (next, chrono::Utc::now(), 0.0)
    }

    #[test]
    fn status_names_gaps_resets_and_unread_partitions() {
        assert_eq!(
            partition_line(0, Some(&at(90)), Some((0, 100)), Some(4)),
            PartitionLine { lag: Some(10), note: None }
        );
        let gap = partition_line(1, Some(&at(10)), Some((500, 600)), Some(4));
        assert_eq!(gap.lag, Some(100));
        assert!(gap.note.unwrap().contains("retention deleted offsets 10 to 499 (490 messages)"));
        let reset = partition_line(2, Some(&at(5000)), Some((0, 12)), Some(4));
        assert_eq!(reset.lag, None);
        assert!(reset.note.unwrap().contains("--on-topic-reset start-over"));
        let added = partition_line(5, None, Some((0, 40)), Some(6));
        assert_eq!(added.lag, Some(40));
        assert!(added.note.unwrap().contains("earliest offset 0"));
        let gone = partition_line(7, Some(&at(3)), None, Some(4));
        assert!(gone.note.unwrap().contains("only 4 partitions"));
        assert_eq!(partition_line(1, Some(&at(3)), None, None), PartitionLine { lag: None, note: None });
    }
}
