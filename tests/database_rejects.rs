//! Promise 6: a record that passes validation but that the database refuses (here a CHECK
//! constraint the operator added) never stalls the pipeline: it becomes a dead letter with
//! the database's own reason, exactly once, and every record around it lands.

mod common;

use std::time::Duration;

use common::{Job, Stack};
use rdkafka::producer::{BaseRecord, Producer};

#[test]
fn a_record_the_database_refuses_is_dead_lettered_with_its_reason_and_its_neighbours_land() {
    refused_records_become_dead_letters("db_rejects", &[]);
}

#[test]
fn with_natural_key_dedup_a_refused_record_is_dead_lettered_too() {
    refused_records_become_dead_letters("db_rejects_nk", &["--dedup", "natural-key"]);
}

fn refused_records_become_dead_letters(name: &str, flags: &[&str]) {
    let stack = Stack::start(name, 2);
    let rt = common::runtime();
    rt.block_on(async {
        let mut client = fleetflow::sink::connect(&stack.db.url).await.unwrap();
        fleetflow::sink::schema::migrate(&mut client, &stack.db.url).await.unwrap();
        client.batch_execute("ALTER TABLE metrics ADD CONSTRAINT cpu_at_most_100 CHECK (cpu <= 100)").await.unwrap();
    });

    // 2,000 records of 50 servers; every 97th has a cpu the constraint refuses.
    let now = fleetflow::record::now_ms();
    let deliveries = std::sync::Arc::new(fleetflow::loadgen::Deliveries::default());
    let producer = fleetflow::kafka::producer::producer(
        &stack.broker.kafka(&stack.topic).into(),
        fleetflow::loadgen::ArcContext(deliveries.clone()),
    )
    .unwrap();
    let total = 2_000;
    let refused: Vec<usize> = (0..total).filter(|i| i % 97 == 13).collect();
    for i in 0..total {
        let id = format!("s{}", i % 50);
        let cpu = if refused.contains(&i) { 150 } else { (i % 100) as i64 };
        let body = format!(r#"{{"serverId":"{id}","cpu":{cpu},"ram":50,"ts":{}}}"#, now - 600_000 + i as i64);
        producer.send(BaseRecord::to(&stack.topic).key(&id).payload(&body)).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    // Two runs: the second finds nothing left to do (dead letters are exactly once too).
    for run in ["first", "second"] {
        let mut args = vec!["--exit-when-idle", "2s"];
        args.extend_from_slice(flags);
        let mut job = Job::start(&stack, run, 1, 2, &args);
        job.wait_success(Duration::from_secs(120));
    }
    let good = (total - refused.len()) as i64;
    let db = &stack.db;
    assert_eq!(db.scalar("SELECT count(*) FROM metrics WHERE cpu > 100"), 0);
    assert_eq!(
        db.scalar("SELECT count(*) FROM fleetflow_dead_letters WHERE kind = 'rejected_by_database'"),
        refused.len() as i64
    );
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM fleetflow_dead_letters WHERE reason LIKE '%cpu_at_most_100%' \
             AND reason LIKE '%23514%' AND (convert_from(raw, 'UTF8')::jsonb ->> 'cpu')::float8 = 150 \
             AND raw_length = length(raw) AND raw_sha256 = sha256(raw)"
        ),
        refused.len() as i64,
        "each dead letter names the constraint and SQLSTATE, and keeps the record"
    );
    // Every message is either a row or a dead letter, once; offsets reached the end.
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM (SELECT kafka_partition, kafka_offset FROM metrics \
             UNION SELECT partition, \"offset\" FROM fleetflow_dead_letters) d"
        ),
        total as i64
    );
    let committed = db.pairs("SELECT partition, next_offset FROM fleetflow_offsets ORDER BY partition");
    assert_eq!(committed, stack.end_offsets(2));
    assert_eq!(db.scalar("SELECT count(*) FROM metrics"), good);
    // The rollups count only what was written.
    assert_eq!(db.scalar("SELECT sum(count)::bigint FROM metrics_1m"), good);
}

#[test]
fn a_flood_of_bad_records_is_dead_lettered_exactly_once_and_good_ones_still_land() {
    let stack = Stack::start("bad_flood", 2);
    stack.produce(20_000, 200, 5, 1.0);
    stack.produce(1_000, 50, 6, 0.0);
    let mut job = Job::start(&stack, "flood", 1, 2, &["--exit-when-idle", "2s"]);
    job.wait_success(Duration::from_secs(180));
    let db = &stack.db;
    assert_eq!(db.scalar("SELECT count(*) FROM fleetflow_dead_letters"), 20_000);
    assert_eq!(
        db.scalar("SELECT count(*) FROM (SELECT DISTINCT partition, \"offset\" FROM fleetflow_dead_letters) d"),
        20_000
    );
    // No message is both; all of them are accounted for.
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM metrics m JOIN fleetflow_dead_letters d \
             ON d.partition = m.kafka_partition AND d.\"offset\" = m.kafka_offset"
        ),
        0
    );
    let committed = db.pairs("SELECT partition, next_offset FROM fleetflow_offsets ORDER BY partition");
    assert_eq!(committed, stack.end_offsets(2));
    assert_eq!(db.scalar("SELECT count(*) FROM metrics"), 1_000);
}
