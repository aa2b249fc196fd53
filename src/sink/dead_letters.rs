//! Dead letters: messages that did not become rows, with their position and the reason,
//! written with binary COPY in the rows' own transaction, so exactly once like the rows and
//! at the speed of rows (a flood of bad records must not become the bottleneck).

use futures_util::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use super::SinkError;
use crate::envelope::DeadLetter;
use crate::record::{format_micros, Metric};

/// The kind of a row the database refused although it passed validation.
pub const REJECTED_BY_DATABASE: &str = "rejected_by_database";

const COPY: &str = "COPY fleetflow_dead_letters \
     (topic, partition, \"offset\", key, raw, kind, reason, message_time, raw_length, raw_sha256) \
     FROM STDIN (FORMAT binary)";
const TYPES: [Type; 10] = [
    Type::TEXT,
    Type::INT4,
    Type::INT8,
    Type::BYTEA,
    Type::BYTEA,
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::INT8,
    Type::BYTEA,
];

/// A dead letter and where its message was.
pub struct DeadLetterRow<'a> {
    pub partition: i32,
    pub offset: i64,
    pub letter: &'a DeadLetter,
}

/// Writes the dead letters with one binary COPY.
pub async fn copy_dead_letters(tx: &Transaction<'_>, topic: &str, rows: &[DeadLetterRow<'_>]) -> Result<(), SinkError> {
    if rows.is_empty() {
        return Ok(());
    }
    let writer = BinaryCopyInWriter::new(tx.copy_in(COPY).await?, &TYPES);
    pin_mut!(writer);
    for row in rows {
        let d = row.letter;
        let time = d.message_time_ms.and_then(chrono::DateTime::from_timestamp_millis);
        // Reasons quote input with escapes, but a text column must never see a NUL.
        let reason = d.reason.replace('\0', "\\u0000");
        let values: [&(dyn ToSql + Sync); 10] = [
            &topic,
            &row.partition,
            &row.offset,
            &d.key,
            &d.raw,
            &d.kind,
            &reason,
            &time,
            &d.raw_length,
            &d.raw_sha256,
        ];
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// A record the database refused (a constraint, a value it cannot store) as a dead letter:
/// the record as JSON (what the job tried to write; the original message bytes are not kept
/// for valid records) and the database's own words as the reason.
pub fn rejected_row(metric: &Metric, reason: String) -> DeadLetter {
    let mut object = serde_json::Map::new();
    object.insert("serverId".into(), metric.server_id.as_str().into());
    object.insert("ts".into(), format_micros(metric.time_us).into());
    if let Some(cpu) = metric.cpu {
        object.insert("cpu".into(), cpu.into());
    }
    if let Some(ram) = metric.ram {
        object.insert("ram".into(), ram.into());
    }
    for (name, value) in &metric.extra {
        object.insert(name.to_string(), (*value).into());
    }
    let raw = serde_json::Value::Object(object).to_string().into_bytes();
    DeadLetter::new(None, &raw, REJECTED_BY_DATABASE, reason, Some(metric.time_us.div_euclid(1000)))
}
