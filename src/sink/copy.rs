//! Binary COPY of metric rows: the statements, the row encoding, and [`copy_rows`], the
//! benchmark's database ceiling.
//!
//! This is the hot path: every row written goes through `copy_batch`, which encodes
//! straight from the envelopes into the COPY buffer (the extra fields are written as JSON text
//! from their pairs, with no JSON value built in between). Keep it that lean. What happens around it
//! (transactions, the exactly-once filter, retries) is `sink::writer`'s.

use bytes::{BufMut, BytesMut};
use futures_util::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{accepts, to_sql_checked, IsNull, ToSql, Type};
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

/// Writes metric rows with binary COPY, one COPY per transaction of
/// `MAX_ROWS_PER_TRANSACTION`, with no bookkeeping: the database ceiling of `bench`.
pub async fn copy_rows(client: &mut Client, rows: &[Envelope]) -> Result<(), SinkError> {
    for transaction in rows.chunks(MAX_ROWS_PER_TRANSACTION) {
        let tx = client.transaction().await?;
        let refs: Vec<&Envelope> = transaction.iter().collect();
        copy_batch(&tx, COPY_METRICS, &refs).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// The extra numeric fields as a jsonb value, encoded straight from the pairs into the COPY
/// buffer. This was serde_json through `Json` (12% of a 1x1 job's profile, with the fields in
/// a heap block of their own; 4% now, with this and `record::Extras`). The output is serde_json's
/// JSON text, byte for byte: the unit tests compare the two.
#[derive(Debug)]
struct ExtraFields<'a>(&'a [(crate::record::Name, f64)]);

impl ToSql for ExtraFields<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1); // jsonb's binary format: a version byte, then the JSON text
        }
        write_json_object(self.0, out);
        Ok(IsNull::No)
    }

    accepts!(JSON, JSONB);
    to_sql_checked!();
}

/// A `timestamptz` in PostgreSQL's binary form, straight from microseconds since the Unix
/// epoch: chrono's encoder rebuilt its calendar base date for every row (2% of a 1x1 job's
/// profile). Decoding bounds record times far inside the range of both.
#[derive(Debug)]
struct Timestamp(i64);

/// 2000-01-01T00:00:00Z, PostgreSQL's epoch, in microseconds since the Unix epoch.
const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

impl ToSql for Timestamp {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_i64(self.0 - POSTGRES_EPOCH_US);
        Ok(IsNull::No)
    }

    accepts!(TIMESTAMPTZ);
    to_sql_checked!();
}

/// `{"name":number,...}`, in the pairs' order.
fn write_json_object(pairs: &[(crate::record::Name, f64)], out: &mut BytesMut) {
    out.put_u8(b'{');
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        // Names that need no escaping (all real ones) are copied; serde_json escapes the rest.
        if name.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            out.put_u8(b'"');
            out.put_slice(name.as_bytes());
            out.put_u8(b'"');
        } else {
            let escaped = serde_json::to_string(name.as_str()).expect("a string always serializes");
            out.put_slice(escaped.as_bytes());
        }
        out.put_u8(b':');
        // Decoding refuses non-finite numbers; should one get here, it is null, as serde_json writes it.
        if value.is_finite() {
            out.put_slice(zmij::Buffer::new().format_finite(*value).as_bytes());
        } else {
            out.put_slice(b"null");
        }
    }
    out.put_u8(b'}');
}

/// One COPY of the metric rows among `envelopes` (dead letters are skipped). One statement
/// for all of a transaction's rows: each COPY costs a round trip and the hypertable's insert
/// set-up.
pub(super) async fn copy_batch(
    tx: &Transaction<'_>,
    statement: &str,
    envelopes: &[&Envelope],
) -> Result<(), SinkError> {
    let sink = tx.copy_in(statement).await?;
    let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    pin_mut!(writer);
    for env in envelopes {
        let Item::Metric(m) = &env.item else { continue };
        let time = Timestamp(m.time_us);
        let extra = (!m.extra.is_empty()).then(|| ExtraFields(&m.extra));
        let server_id = m.server_id.as_str();
        let row: [&(dyn ToSql + Sync); 7] = [&time, &server_id, &m.cpu, &m.ram, &extra, &env.partition, &env.offset];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::record::Name;

    /// What serde_json writes for the same pairs: the encoder's reference.
    fn serde_json_object(pairs: &[(Name, f64)]) -> String {
        let entries: Vec<String> = pairs
            .iter()
            .map(|(k, v)| {
                format!("{}:{}", serde_json::to_string(k.as_str()).unwrap(), serde_json::to_string(v).unwrap())
            })
            .collect();
        format!("{{{}}}", entries.join(","))
    }

    fn encode(pairs: &[(Name, f64)], ty: &Type) -> Vec<u8> {
        let mut out = BytesMut::new();
        ExtraFields(pairs).to_sql(ty, &mut out).unwrap();
        out.to_vec()
    }

    fn chrono_encoding(us: i64) -> BytesMut {
        let mut out = BytesMut::new();
        chrono::DateTime::from_timestamp_micros(us).unwrap().to_sql(&Type::TIMESTAMPTZ, &mut out).unwrap();
        out
    }

    fn our_encoding(us: i64) -> BytesMut {
        let mut out = BytesMut::new();
        Timestamp(us).to_sql(&Type::TIMESTAMPTZ, &mut out).unwrap();
        out
    }

    #[test]
    fn timestamps_at_the_edges_are_encoded_as_chrono_encodes_them() {
        use crate::record::{EARLIEST_TIME_US, LATEST_TIME_US};
        for us in [EARLIEST_TIME_US, -1, 0, 1, POSTGRES_EPOCH_US - 1, POSTGRES_EPOCH_US, LATEST_TIME_US] {
            assert_eq!(our_encoding(us), chrono_encoding(us), "{us}");
        }
    }

    #[test]
    fn extra_fields_are_jsonb_version_one_then_the_json_text() {
        let pairs = [(Name::new("disk"), 3.5), (Name::new("net_in"), 1200.0), (Name::new("load1"), -0.25)];
        let jsonb = encode(&pairs, &Type::JSONB);
        assert_eq!(jsonb[0], 1);
        assert_eq!(std::str::from_utf8(&jsonb[1..]).unwrap(), r#"{"disk":3.5,"net_in":1200.0,"load1":-0.25}"#);
        assert_eq!(encode(&pairs, &Type::JSON), jsonb[1..].to_vec(), "json has no version byte");
    }

    #[test]
    fn names_that_need_escaping_are_escaped() {
        let pairs = [(Name::new("a\"b\\c\u{1}\n"), 1.0), (Name::new("é\u{7f}"), 2.0)];
        let text = String::from_utf8(encode(&pairs, &Type::JSON)).unwrap();
        assert_eq!(text, "{\"a\\\"b\\\\c\\u0001\\n\":1.0,\"é\u{7f}\":2.0}");
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["a\"b\\c\u{1}\n"], 1.0);
    }

    proptest! {
        /// Every time a decoded record can hold is encoded as chrono encodes it.
        #[test]
        fn any_record_time_is_encoded_as_chrono_encodes_it(
            us in crate::record::EARLIEST_TIME_US..=crate::record::LATEST_TIME_US
        ) {
            prop_assert_eq!(our_encoding(us), chrono_encoding(us));
        }

        /// Any names and finite numbers: the same bytes serde_json writes, so the stored jsonb
        /// is what it was before the encoder was written by hand.
        #[test]
        fn extra_fields_encode_as_serde_json_does(
            pairs in prop::collection::vec(
                (".{0,12}", prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO),
                0..6,
            )
        ) {
            let pairs: Vec<(Name, f64)> = pairs.into_iter().map(|(k, v)| (Name::from(k), v)).collect();
            prop_assert_eq!(String::from_utf8(encode(&pairs, &Type::JSON)).unwrap(), serde_json_object(&pairs));
        }
    }
}
