//! Promise 3: every kind of malformed message lands in fleetflow_dead_letters exactly once,
//! with its position, raw bytes (the first 4 KiB, with the length and SHA-256 of all of them)
//! and reason, while the good records around it are written. Promise 6: that includes what
//! PostgreSQL could not store (a NUL in a serverId or a field name), which once halted the job.

mod common;

use std::time::Duration;

use common::{Job, Stack};
use rdkafka::producer::{BaseRecord, Producer};
use sha2::Digest;

/// (key, value, expected dead-letter kind or None for a good record)
type TestMessage = (Option<Vec<u8>>, Vec<u8>, Option<&'static str>);

fn messages(now_ms: i64) -> Vec<TestMessage> {
    let good = |i: usize| {
        let id = format!("s{i}");
        let body = format!(r#"{{"serverId":"{id}","cpu":{i},"ram":50,"ts":{}}}"#, now_ms - 60_000 + i as i64);
        (Some(id.into_bytes()), body.into_bytes(), None)
    };
    let bad = |key: &str, body: &[u8], kind| (Some(key.as_bytes().to_vec()), body.to_vec(), Some(kind));
    let long_id = "x".repeat(300);
    // 1 MB: over the job's 64 KiB limit, under the broker's own 1 MiB limit.
    let huge = format!(r#"{{"serverId":"big","cpu":1,"pad":"{}"}}"#, "y".repeat(1_000_000 - 35)).into_bytes();
    assert_eq!(huge.len(), 1_000_000);
    let fields: Vec<String> = (0..65).map(|i| format!(r#""f{i}":{i}"#)).collect();
    let too_many_fields = format!(r#"{{"serverId":"n5","cpu":1,{}}}"#, fields.join(","));
    let long_field_name = format!(r#"{{"serverId":"n6","cpu":1,"{}":1}}"#, "f".repeat(129));
    let bad_cases = vec![
        bad("m1", br#"{"serverId":"m1","cpu":"#, "malformed_json"),
        bad("m2", b"[1,2,3]", "not_an_object"),
        bad("m3", br#"{"cpu":1,"ram":2}"#, "missing_server_id"),
        bad("m4", br#"{"serverId":"","cpu":1}"#, "empty_server_id"),
        (
            Some(long_id.clone().into_bytes()),
            format!(r#"{{"serverId":"{long_id}","cpu":1}}"#).into_bytes(),
            Some("server_id_too_long"),
        ),
        bad("m6", br#"{"serverId":"m6","cpu":"high"}"#, "wrong_type"),
        bad("m7", br#"{"serverId":"m7","cpu":1e999}"#, "non_finite"),
        bad("m8", br#"{"serverId":"m8","cpu":NaN}"#, "malformed_json"),
        bad("m9", br#"{"serverId":"m9","cpu":1,"ts":"1999-01-01T00:00:00Z"}"#, "timestamp_out_of_bounds"),
        bad(
            "m10",
            format!(r#"{{"serverId":"m10","cpu":1,"ts":{}}}"#, now_ms + 86_400_000).as_bytes(),
            "timestamp_out_of_bounds",
        ),
        bad("big", &huge, "too_large"),
        bad("m12", b"{\"serverId\":\"m12\xff\",\"cpu\":1}", "invalid_utf8"),
        bad("someone-else", br#"{"serverId":"m13","cpu":1}"#, "key_mismatch"),
        (None, b"not json at all".to_vec(), Some("malformed_json")),
        // What PostgreSQL cannot store: a NUL in the serverId (keyed and keyless) or in the
        // name of an extra field (a jsonb key).
        (Some(b"n1\0x".to_vec()), br#"{"serverId":"n1\u0000x","cpu":1}"#.to_vec(), Some("unstorable_text")),
        (None, br#"{"serverId":"n2\u0000","cpu":1,"ram":2}"#.to_vec(), Some("unstorable_text")),
        bad("n3", br#"{"serverId":"n3","cpu":1,"d\u0000isk":2}"#, "unstorable_text"),
        (None, br#"{"serverId":"n4","\u0000":2}"#.to_vec(), Some("unstorable_text")),
        bad("n5", too_many_fields.as_bytes(), "too_many_fields"),
        bad("n6", long_field_name.as_bytes(), "field_name_too_long"),
    ];
    let mut all = Vec::new();
    for (i, b) in bad_cases.into_iter().enumerate() {
        all.push(good(2 * i));
        all.push(b);
        all.push(good(2 * i + 1));
    }
    all
}

#[test]
fn every_kind_of_bad_message_is_dead_lettered_once_and_the_rest_lands() {
    let stack = Stack::start("bad_input", 2);
    let now = fleetflow::record::now_ms();
    let messages = messages(now);
    let deliveries = std::sync::Arc::new(fleetflow::loadgen::Deliveries::default());
    let kafka = fleetflow::config::KafkaConfig {
        options: vec![("message.max.bytes".into(), "2000000".into())],
        ..stack.broker.kafka(&stack.topic).into()
    };
    let producer =
        fleetflow::kafka::producer::producer(&kafka, fleetflow::loadgen::ArcContext(deliveries.clone())).unwrap();
    for (i, (key, value, _)) in messages.iter().enumerate() {
        // Spread over both partitions so both source workers see bad input.
        let mut record = BaseRecord::to(&stack.topic).payload(value).partition((i % 2) as i32);
        if let Some(k) = key {
            record = record.key(k);
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let delivered = deliveries.delivered.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(delivered, messages.len() as u64, "the broker acknowledged every message");

    // Two runs: the second must not add anything (dead letters are exactly-once too).
    for run in ["first", "second"] {
        let mut job = Job::start(&stack, run, 1, 2, &["--exit-when-idle", "2s"]);
        job.wait_success(Duration::from_secs(120));
    }

    let db = &stack.db;
    let expected_bad: Vec<&str> = messages.iter().filter_map(|m| m.2).collect();
    let good = (messages.len() - expected_bad.len()) as i64;
    assert_eq!(db.scalar("SELECT count(*) FROM metrics"), good);
    assert_eq!(db.scalar("SELECT count(*) FROM fleetflow_dead_letters"), expected_bad.len() as i64);
    assert_eq!(
        db.scalar("SELECT count(*) FROM (SELECT DISTINCT partition, \"offset\" FROM fleetflow_dead_letters) d"),
        expected_bad.len() as i64
    );
    let rt = common::runtime();
    let rows = rt.block_on(async {
        let client = fleetflow::sink::connect(&db.url).await.unwrap();
        client
            .query(
                "SELECT kind, reason, raw, raw_length, raw_sha256 FROM fleetflow_dead_letters \
                 ORDER BY partition, \"offset\"",
                &[],
            )
            .await
            .unwrap()
    });
    type Letter = (String, Vec<u8>, Option<i64>, Option<Vec<u8>>);
    let mut got: Vec<Letter> = rows.iter().map(|r| (r.get(0), r.get(2), r.get(3), r.get(4))).collect();
    for row in &rows {
        let (kind, reason) = (row.get::<_, String>(0), row.get::<_, String>(1));
        assert!(!reason.is_empty(), "every dead letter has a reason");
        if kind == "unstorable_text" {
            assert!(reason.contains("contains a NUL character (U+0000)"), "{reason}");
        }
    }
    // The first 4 KiB of the raw bytes are kept, with the length and hash of all of them.
    let keep = fleetflow::envelope::DEAD_LETTER_RAW_BYTES;
    let mut want: Vec<Letter> = messages
        .iter()
        .filter(|m| m.2.is_some())
        .map(|m| {
            let sha = sha2::Sha256::digest(&m.1).to_vec();
            (m.2.unwrap().to_owned(), m.1[..m.1.len().min(keep)].to_vec(), Some(m.1.len() as i64), Some(sha))
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.0, w.0, "dead-letter kind");
        assert!(g.1 == w.1, "raw bytes of a {} dead letter: the first {keep} bytes are kept", g.0);
        assert_eq!((g.2, &g.3), (w.2, &w.3), "length and SHA-256 of a {} dead letter", g.0);
    }
    let (length, raw_kept): (i64, i32) = rt.block_on(async {
        let client = fleetflow::sink::connect(&db.url).await.unwrap();
        let row = client
            .query_one("SELECT raw_length, length(raw) FROM fleetflow_dead_letters WHERE kind = 'too_large'", &[])
            .await
            .unwrap();
        (row.get(0), row.get(1))
    });
    assert_eq!((length, raw_kept), (1_000_000, keep as i32), "a 1 MB message keeps 4 KiB, and its length");
}
