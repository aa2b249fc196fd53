//! The exactly-once filter: per (topic, key group, partition), the highest offset durably
//! written (`fleetflow_watermarks`).
//!
//! The writer raises the watermarks in the same transaction as the rows, so a message
//! replayed after a crash is recognised (offset at or below its watermark) and dropped.
//! They are kept per key group, not per worker, so a run with another worker count still
//! knows what was written (see docs/architecture.md). [`plan`] is the decision itself, pure
//! and apart from the database so it can be tested on its own.

use tokio_postgres::{Client, Transaction};

use super::writer::EpochWrite;
use super::{FastMap, SinkError};
use crate::envelope::{Envelope, Item};

/// Watermarks of the given key groups: (key group, partition) -> highest offset written.
pub async fn load_watermarks(
    client: &Client,
    topic: &str,
    key_groups: &[u16],
) -> Result<FastMap<(u16, i32), i64>, SinkError> {
    let groups: Vec<i32> = key_groups.iter().map(|g| *g as i32).collect();
    let rows = client
        .query(
            "SELECT key_group, partition, last_offset FROM fleetflow_watermarks
             WHERE topic = $1 AND key_group = ANY($2)",
            &[&topic, &groups],
        )
        .await?;
    Ok(rows.iter().map(|r| ((r.get::<_, i32>(0) as u16, r.get(1)), r.get(2))).collect())
}

/// What a transaction will write once replayed messages are removed.
#[derive(Default)]
pub(super) struct Plan<'a> {
    pub(super) batches: Vec<Vec<&'a Envelope>>,
    pub(super) dead_letters: Vec<&'a Envelope>,
    pub(super) watermarks: FastMap<(u16, i32), i64>,
    pub(super) skipped: u64,
    pub(super) rows: u64,
}

/// Drops every message at or below its (key group, partition) watermark and computes the
/// new watermarks.
pub(super) fn plan<'a>(group: &'a [EpochWrite], watermarks: &FastMap<(u16, i32), i64>) -> Plan<'a> {
    let mut plan = Plan::default();
    for batch in group.iter().flat_map(|w| &w.batches) {
        let mut rows = Vec::with_capacity(batch.len());
        for env in batch {
            let key = (env.key_group, env.partition);
            let written = plan.watermarks.get(&key).or_else(|| watermarks.get(&key)).copied().unwrap_or(-1);
            if env.offset <= written {
                plan.skipped += 1;
                continue;
            }
            plan.watermarks.insert(key, env.offset);
            match env.item {
                Item::Metric(_) => rows.push(env),
                Item::DeadLetter(_) => plan.dead_letters.push(env),
            }
        }
        plan.rows += rows.len() as u64;
        if !rows.is_empty() {
            plan.batches.push(rows);
        }
    }
    plan
}

pub(super) async fn raise_watermarks(
    tx: &Transaction<'_>,
    topic: &str,
    watermarks: &FastMap<(u16, i32), i64>,
) -> Result<(), SinkError> {
    if watermarks.is_empty() {
        return Ok(());
    }
    let groups: Vec<i32> = watermarks.keys().map(|k| k.0 as i32).collect();
    let partitions: Vec<i32> = watermarks.keys().map(|k| k.1).collect();
    let offsets: Vec<i64> = watermarks.values().copied().collect();
    tx.execute(
        "INSERT INTO fleetflow_watermarks (topic, key_group, partition, last_offset)
         SELECT $1, g, p, o FROM unnest($2::int[], $3::int[], $4::bigint[]) AS t(g, p, o)
         ON CONFLICT (topic, key_group, partition) DO UPDATE
           SET last_offset = GREATEST(fleetflow_watermarks.last_offset, EXCLUDED.last_offset)",
        &[&topic, &groups, &partitions, &offsets],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Metric;

    fn env(key_group: u16, partition: i32, offset: i64) -> Envelope {
        let metric = Metric { server_id: "s1".into(), time_us: 0, cpu: Some(1.0), ram: None, extra: vec![] };
        Envelope { key_group, partition, offset, item: Item::Metric(metric) }
    }

    #[test]
    fn replayed_messages_at_or_below_their_watermark_are_dropped() {
        let group =
            vec![EpochWrite { epoch: 1, batches: vec![vec![env(1, 0, 5), env(1, 0, 6), env(2, 0, 5), env(1, 1, 3)]] }];
        let watermarks = FastMap::from_iter([((1, 0), 5), ((1, 1), 7)]);
        let plan = plan(&group, &watermarks);
        let kept: Vec<(u16, i32, i64)> =
            plan.batches.iter().flatten().map(|e| (e.key_group, e.partition, e.offset)).collect();
        assert_eq!(kept, vec![(1, 0, 6), (2, 0, 5)]);
        assert_eq!(plan.skipped, 2);
        assert_eq!(plan.watermarks, FastMap::from_iter([((1, 0), 6), ((2, 0), 5)]));
    }

    #[test]
    fn a_message_sent_twice_in_one_transaction_is_written_once() {
        let group = vec![
            EpochWrite { epoch: 1, batches: vec![vec![env(3, 2, 10)]] },
            EpochWrite { epoch: 2, batches: vec![vec![env(3, 2, 10), env(3, 2, 11)]] },
        ];
        let plan = plan(&group, &FastMap::default());
        assert_eq!(plan.rows, 2);
        assert_eq!(plan.skipped, 1);
    }
}
