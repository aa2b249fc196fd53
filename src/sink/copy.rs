//! Binary COPY of metric rows: the statements, the row encoding, and [`copy_rows`], the
//! benchmark's database ceiling.
//!
//! This is the hot path: every row written goes through `copy_batch`, which encodes
//! straight from the envelopes into the COPY buffer (the extra fields serialize from their
//! pairs, with no JSON value built in between). Keep it that lean. What happens around it
//! (transactions, the exactly-once filter, retries) is `sink::writer`'s.

use futures_util::pin_mut;
use serde::ser::{Serialize, SerializeMap, Serializer};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};
use tokio_postgres::{Client, Transaction};

use super::SinkError;
use crate::envelope::{Envelope, Item};

/// Rows in one transaction at most: the writer merges epochs that queued up while the last
/// transaction ran up to this, and the database ceiling of `bench` copies chunks of it.
pub(super) const MAX_ROWS_PER_TRANSACTION: usize = 50_000;

pub(super) const COPY_METRICS: &str =
    "COPY metrics (time, server_id, cpu, ram, extra, kafka_partition, kafka_offset) FROM STDIN (FORMAT binary)";
pub(super) const COPY_STAGING: &str =
    "COPY fleetflow_staging (time, server_id, cpu, ram, extra, kafka_partition, kafka_offset) FROM STDIN (FORMAT binary)";
const COPY_TYPES: [Type; 7] =
    [Type::TIMESTAMPTZ, Type::TEXT, Type::FLOAT8, Type::FLOAT8, Type::JSONB, Type::INT4, Type::INT8];

/// Writes metric rows with binary COPY, in batches of 1,000 and transactions of
/// `MAX_ROWS_PER_TRANSACTION`, with no bookkeeping: the database ceiling of `bench`.
pub async fn copy_rows(client: &mut Client, rows: &[Envelope]) -> Result<(), SinkError> {
    for transaction in rows.chunks(MAX_ROWS_PER_TRANSACTION) {
        let tx = client.transaction().await?;
        for batch in transaction.chunks(1000) {
            let refs: Vec<&Envelope> = batch.iter().collect();
            copy_batch(&tx, COPY_METRICS, &refs).await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

/// The extra numeric fields as a JSON object, serialized straight from the pairs.
#[derive(Debug)]
struct ExtraFields<'a>(&'a [(crate::record::Name, f64)]);

impl Serialize for ExtraFields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

pub(super) async fn copy_batch(tx: &Transaction<'_>, statement: &str, batch: &[&Envelope]) -> Result<(), SinkError> {
    let sink = tx.copy_in(statement).await?;
    let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    pin_mut!(writer);
    for env in batch {
        let Item::Metric(m) = &env.item else { continue };
        let time = chrono::DateTime::from_timestamp_micros(m.time_us).unwrap_or_default();
        let extra = (!m.extra.is_empty()).then(|| Json(ExtraFields(&m.extra)));
        let server_id = m.server_id.as_str();
        let row: [&(dyn ToSql + Sync); 7] = [&time, &server_id, &m.cpu, &m.ram, &extra, &env.partition, &env.offset];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    Ok(())
}
