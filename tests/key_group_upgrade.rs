//! Upgrading past schema 7, which changed how key groups are hashed (FNV-1a to Kafka's
//! murmur2), loses and duplicates nothing: a message that a job of the older version wrote
//! beyond its committed offsets, and a restart replays, is recognised by its old watermark.

mod common;

use std::time::Duration;

use common::{assert_exactly_once, runtime, Job, Stack};
use fleetflow::partitioning::{fnv_message_key_group, KEY_GROUPS};

const RECORDS: u64 = 20_000;
const BAD_FRACTION: f64 = 0.02;

#[test]
fn messages_an_older_version_wrote_past_its_commit_are_not_written_again() {
    let stack = Stack::start("key_group_upgrade", 4);
    stack.produce(RECORDS, 200, 11, BAD_FRACTION);
    let db = &stack.db;

    let mut job = Job::start(&stack, "first", 1, 2, &["--exit-when-idle", "1s", "--rollups", "false"]);
    job.wait_success(Duration::from_secs(180));
    let rows = db.scalar("SELECT count(*) FROM metrics");
    let letters = db.scalar("SELECT count(*) FROM fleetflow_dead_letters");
    assert_eq!(rows + letters, RECORDS as i64);
    assert!(letters > 0, "the stream should hold dead letters too");

    // Turn the database into what a job of the older version leaves when it dies mid-stream:
    // from the middle of each partition on, only the key groups (its FNV-1a ones) whose
    // writer got there wrote; the offsets are committed up to the middle; its watermarks
    // are the FNV ones, and its schema is version 6: the next start applies migration 7.
    let cut: Vec<(i32, i64)> = stack.end_offsets(4).into_iter().map(|(p, end)| (p, end / 2)).collect();
    let (mut kept, mut dropped, mut fnv_rows) = (0, 0, 0);
    runtime().block_on(async {
        let client = fleetflow::sink::connect(&db.url).await.unwrap();
        let messages = client
            .query(
                "SELECT kafka_partition, kafka_offset, convert_to(server_id, 'UTF8'), 'metrics' FROM metrics
                 UNION ALL
                 SELECT partition, \"offset\", key, 'letters' FROM fleetflow_dead_letters",
                &[],
            )
            .await
            .unwrap();
        let raw: std::collections::HashMap<(i32, i64), Vec<u8>> = client
            .query("SELECT partition, \"offset\", raw FROM fleetflow_dead_letters", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        let mut fnv_marks: std::collections::HashMap<(i32, i32), i64> = Default::default();
        let (mut doomed_rows, mut doomed_letters) = ((Vec::<i32>::new(), Vec::<i64>::new()), (Vec::new(), Vec::new()));
        for m in &messages {
            let (partition, offset, key, table): (i32, i64, Option<Vec<u8>>, &str) =
                (m.get(0), m.get(1), m.get(2), m.get(3));
            let value = raw.get(&(partition, offset)).map(Vec::as_slice).unwrap_or(b"");
            let group = fnv_message_key_group(key.as_deref(), value, partition);
            let above_cut = offset >= cut[partition as usize].1;
            if above_cut && group % 2 == 1 {
                let doomed = if table == "metrics" { &mut doomed_rows } else { &mut doomed_letters };
                doomed.0.push(partition);
                doomed.1.push(offset);
                dropped += 1;
            } else {
                if above_cut {
                    kept += 1;
                }
                let mark = fnv_marks.entry((group as i32, partition)).or_insert(-1);
                *mark = (*mark).max(offset);
            }
        }
        for (table, partition, offset, doomed) in [
            ("metrics", "kafka_partition", "kafka_offset", doomed_rows),
            ("fleetflow_dead_letters", "partition", "\"offset\"", doomed_letters),
        ] {
            let sql = format!(
                "DELETE FROM {table} WHERE ({partition}, {offset}) IN (SELECT * FROM unnest($1::int[], $2::bigint[]))"
            );
            client.execute(&sql, &[&doomed.0, &doomed.1]).await.unwrap();
        }
        client
            .batch_execute(
                "DELETE FROM fleetflow_watermarks; DROP TABLE fleetflow_fnv_watermarks;
                 DELETE FROM fleetflow_schema_version WHERE version >= 7",
            )
            .await
            .unwrap();
        fnv_rows = fnv_marks.len() as i64;
        for ((group, partition), offset) in fnv_marks {
            assert!(group < KEY_GROUPS as i32);
            client
                .execute(
                    "INSERT INTO fleetflow_watermarks (topic, key_group, partition, last_offset)
                     VALUES ('metrics', $1, $2, $3)",
                    &[&group, &partition, &offset],
                )
                .await
                .unwrap();
        }
        for (partition, next) in &cut {
            client
                .execute(
                    "UPDATE fleetflow_offsets SET next_offset = $2, landmark_offset = NULL, landmark_time_ms = NULL,
                         landmark_hash = NULL WHERE partition = $1",
                    &[partition, next],
                )
                .await
                .unwrap();
        }
    });
    assert!(kept > 1_000 && dropped > 1_000, "both kinds of replayed message: {kept} written, {dropped} not");

    let mut again = Job::start(&stack, "after_upgrade", 2, 1, &["--exit-when-idle", "1s", "--rollups", "false"]);
    again.wait_success(Duration::from_secs(180));
    assert_exactly_once(&stack, rows, 4);
    assert_eq!(db.scalar("SELECT count(*) FROM fleetflow_dead_letters"), letters, "dead letters");
    assert_eq!(
        db.scalar("SELECT count(*) FROM (SELECT DISTINCT partition, \"offset\" FROM fleetflow_dead_letters) d"),
        letters,
        "a dead letter written twice"
    );
    let skipped: u64 = (0..2).map(|i| again.summary(i).replayed_skipped).sum();
    assert_eq!(skipped, kept, "each message the older version wrote past its commit is skipped once");
    assert!(again.log_text().contains("before schema 7"), "{}", again.log_tail());
    assert_eq!(db.scalar("SELECT max(version)::bigint FROM fleetflow_schema_version"), 7);
    assert_eq!(db.scalar("SELECT count(*) FROM fleetflow_fnv_watermarks"), fnv_rows, "the old watermarks moved aside");
}
