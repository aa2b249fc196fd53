//! The exactly-once filter: per (topic, key group, partition), the highest offset durably
//! written (`fleetflow_watermarks`).
//!
//! The writer raises the watermarks in the same transaction as the rows, so a message
//! replayed after a crash is recognised (offset at or below its watermark) and dropped.
//! They are kept per key group, not per worker, so a run with another worker count still
//! knows what was written (see docs/architecture.md). `plan` is the decision itself, pure
//! and apart from the database so it can be tested on its own.
//!
//! Schema version 7 changed the key groups' hash (FNV-1a to Kafka's murmur2, see
//! `partitioning`). The watermarks written before it moved, frozen, to
//! `fleetflow_fnv_watermarks`: [`FnvWatermarks`] lets the reader drop a message replayed
//! from before the upgrade that the older version had already written.

use tokio_postgres::{Client, Transaction};

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

/// The watermarks of a topic written under the FNV-1a key groups of schema versions before 7
/// (`fleetflow_fnv_watermarks`, never raised again). A message at or below the highest of its
/// partition's, which a job of the older version may have written, is checked against the
/// watermark of the key group it had then; the messages above (all of them, once the first
/// run after the upgrade commits past the old ones) cost one comparison.
#[derive(Debug, Default)]
pub struct FnvWatermarks {
    /// partition -> (highest watermark, FNV key group -> watermark)
    partitions: FastMap<i32, (i64, FastMap<u16, i64>)>,
}

impl FnvWatermarks {
    pub async fn load(client: &Client, topic: &str) -> Result<Self, SinkError> {
        let rows = client
            .query("SELECT key_group, partition, last_offset FROM fleetflow_fnv_watermarks WHERE topic = $1", &[&topic])
            .await?;
        Ok(Self::from_rows(rows.iter().map(|r| (r.get::<_, i32>(0) as u16, r.get(1), r.get(2)))))
    }

    /// From (FNV key group, partition, last offset) rows.
    pub fn from_rows(rows: impl IntoIterator<Item = (u16, i32, i64)>) -> Self {
        let mut marks = FnvWatermarks::default();
        for (group, partition, offset) in rows {
            let (highest, groups) = marks.partitions.entry(partition).or_insert((-1, FastMap::default()));
            *highest = (*highest).max(offset);
            groups.insert(group, offset);
        }
        marks
    }

    /// Whether the message at `offset` of `partition` was written by a job of a version
    /// before schema 7.
    pub fn written(&self, partition: i32, offset: i64, key: Option<&[u8]>, value: &[u8]) -> bool {
        match self.partitions.get(&partition) {
            Some((highest, groups)) if offset <= *highest => {
                let group = crate::partitioning::fnv_message_key_group(key, value, partition);
                groups.get(&group).is_some_and(|last| offset <= *last)
            }
            _ => false,
        }
    }

    /// Keeps only the partitions a reader starting at `starts` (partition -> first offset,
    /// `None`: the earliest) may read at or below their highest old watermark.
    pub fn keep_replays(&mut self, starts: &[(i32, Option<i64>)]) {
        self.partitions.retain(|p, (highest, _)| match starts.iter().find(|s| s.0 == *p) {
            Some((_, Some(start))) => *start <= *highest,
            Some((_, None)) => true,
            None => false,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }
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
/// new watermarks. `batches` are the transaction's batches in order (of one epoch or of
/// several queued ones).
pub(super) fn plan<'a>(
    batches: impl IntoIterator<Item = &'a Vec<Envelope>>,
    watermarks: &FastMap<(u16, i32), i64>,
) -> Plan<'a> {
    let mut plan = Plan::default();
    for batch in batches {
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
    use crate::envelope::DeadLetter;
    use crate::record::Metric;
    use proptest::prelude::*;

    fn env(key_group: u16, partition: i32, offset: i64) -> Envelope {
        let metric =
            Metric { server_id: "s1".into(), time_us: 0, cpu: Some(1.0), ram: None, extra: Default::default() };
        Envelope { key_group, partition, offset, item: Item::Metric(metric) }
    }

    #[test]
    fn replayed_messages_at_or_below_their_watermark_are_dropped() {
        let group = [vec![vec![env(1, 0, 5), env(1, 0, 6), env(2, 0, 5), env(1, 1, 3)]]];
        let watermarks = FastMap::from_iter([((1, 0), 5), ((1, 1), 7)]);
        let plan = plan(group.iter().flatten(), &watermarks);
        let kept: Vec<(u16, i32, i64)> =
            plan.batches.iter().flatten().map(|e| (e.key_group, e.partition, e.offset)).collect();
        assert_eq!(kept, vec![(1, 0, 6), (2, 0, 5)]);
        assert_eq!(plan.skipped, 2);
        assert_eq!(plan.watermarks, FastMap::from_iter([((1, 0), 6), ((2, 0), 5)]));
    }

    #[test]
    fn a_message_replayed_from_before_the_upgrade_is_checked_against_its_fnv_watermark() {
        let s1 = br#"{"serverId":"s1","cpu":1}"#;
        let fnv_s1 = crate::partitioning::fnv_message_key_group(Some(b"s1"), s1, 0);
        let other = (fnv_s1 + 1) % crate::partitioning::KEY_GROUPS;
        let marks = FnvWatermarks::from_rows([(fnv_s1, 0, 10), (other, 0, 20), (fnv_s1, 1, 5)]);
        assert!(marks.written(0, 10, Some(b"s1"), s1));
        assert!(marks.written(0, 3, None, s1), "keyless: the body's serverId, as before");
        assert!(!marks.written(0, 11, Some(b"s1"), s1), "above its own group's watermark");
        assert!(!marks.written(0, 21, Some(b"s1"), s1));
        assert!(marks.written(1, 5, Some(b"s1"), s1));
        assert!(!marks.written(1, 6, Some(b"s1"), s1));
        assert!(!marks.written(2, 0, Some(b"s1"), s1), "a partition with no old watermarks");
        // Garbage without a serverId had its partition's key group then too.
        let garbage = FnvWatermarks::from_rows([(0, 0, 7)]);
        assert!(garbage.written(0, 7, None, b"\x00 not json"));
        assert!(!garbage.written(0, 8, None, b"\x00 not json"));
        assert!(FnvWatermarks::default().is_empty() && !marks.is_empty());
        let mut kept = FnvWatermarks::from_rows([(1, 0, 20), (1, 1, 5), (1, 2, 9), (1, 3, 9)]);
        kept.keep_replays(&[(0, Some(21)), (1, Some(5)), (2, None)]);
        let mut partitions: Vec<i32> = kept.partitions.keys().copied().collect();
        partitions.sort_unstable();
        assert_eq!(partitions, [1, 2], "0 starts above its old watermarks, 3 is another reader's");
    }

    #[test]
    fn a_message_sent_twice_in_one_transaction_is_written_once() {
        let group = [vec![vec![env(3, 2, 10)]], vec![vec![env(3, 2, 10), env(3, 2, 11)]]];
        let plan = plan(group.iter().flatten(), &FastMap::default());
        assert_eq!(plan.rows, 2);
        assert_eq!(plan.skipped, 1);
    }

    // The properties below give every record its input position as an id (a metric's
    // serverId or a dead letter's reason), so the tests can tell which records passed.

    /// (key group, partition, offset, whether it is a dead letter) of each record, in order.
    type Spec = Vec<(u16, i32, i64, bool)>;

    fn records(spec: &[(u16, i32, i64, bool)]) -> Vec<Envelope> {
        spec.iter()
            .enumerate()
            .map(|(i, &(key_group, partition, offset, dead))| {
                let item = if dead {
                    Item::DeadLetter(DeadLetter::new(None, b"{", "invalid_json", format!("r{i}"), None))
                } else {
                    let id = format!("r{i}");
                    Item::Metric(Metric {
                        server_id: id.into(),
                        time_us: 0,
                        cpu: Some(1.0),
                        ram: None,
                        extra: Default::default(),
                    })
                };
                Envelope { key_group, partition, offset, item }
            })
            .collect()
    }

    fn id(env: &Envelope) -> usize {
        let tag = match &env.item {
            Item::Metric(m) => m.server_id.as_str(),
            Item::DeadLetter(d) => &d.reason,
        };
        tag[1..].parse().unwrap()
    }

    /// The records cut into batches of `batch_len`, `per_epoch` batches to an epoch.
    fn epochs(records: &[Envelope], batch_len: usize, per_epoch: usize) -> Vec<Vec<Vec<Envelope>>> {
        let batches: Vec<Vec<Envelope>> = records.chunks(batch_len).map(<[Envelope]>::to_vec).collect();
        batches.chunks(per_epoch).map(<[Vec<Envelope>]>::to_vec).collect()
    }

    /// Ids of the rows and of the dead letters a plan writes, in the order it writes them.
    fn passed(plan: &Plan) -> (Vec<usize>, Vec<usize>) {
        (plan.batches.iter().flatten().map(|e| id(e)).collect(), plan.dead_letters.iter().map(|e| id(e)).collect())
    }

    /// Records of a few (key group, partition)s, offsets colliding often, in any order.
    fn any_spec() -> impl Strategy<Value = Spec> {
        proptest::collection::vec((0u16..3, 0i32..2, 0i64..30, proptest::bool::weighted(0.2)), 0..60)
    }

    fn any_watermarks() -> impl Strategy<Value = FastMap<(u16, i32), i64>> {
        proptest::collection::btree_map((0u16..3, 0i32..2), 0i64..30, 0..6).prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        /// Replaying what is already written (a restart from older source offsets) writes
        /// nothing, however the replay is cut into epochs and batches. Catches a filter that
        /// compares with `<` instead of `<=`, or forgets a key's watermark.
        #[test]
        fn replaying_any_prefix_of_written_records_yields_nothing_new(
            spec in any_spec(),
            stored in any_watermarks(),
            prefix in 0usize..=60,
            (batch_len, per_epoch) in (1usize..8, 1usize..4),
            (replay_batch_len, replay_per_epoch) in (1usize..8, 1usize..4),
        ) {
            let records = records(&spec);
            let first = epochs(&records, batch_len, per_epoch);
            let written = plan(first.iter().flatten(), &stored);
            let mut after = stored.clone();
            after.extend(written.watermarks.iter().map(|(k, v)| (*k, *v)));

            let replay = epochs(&records[..prefix.min(records.len())], replay_batch_len, replay_per_epoch);
            let again = plan(replay.iter().flatten(), &after);
            prop_assert!(again.batches.is_empty());
            prop_assert!(again.dead_letters.is_empty());
            prop_assert!(again.watermarks.is_empty());
            prop_assert_eq!(again.rows, 0);
            prop_assert_eq!(again.skipped as usize, prefix.min(records.len()));
        }

        /// Records above their watermark, offsets rising per (key group, partition), all
        /// pass: rows in their batches and in order, dead letters in order, and the new
        /// watermark of each key is its last offset. Catches a filter that drops new
        /// records (an off-by-one at watermark + 1, a key mixed up with another) or
        /// reorders them.
        #[test]
        fn records_above_their_watermark_all_pass_in_order(
            steps in proptest::collection::vec((0u16..3, 0i32..2, 1i64..4, proptest::bool::weighted(0.2)), 0..60),
            stored in any_watermarks(),
            (batch_len, per_epoch) in (1usize..8, 1usize..4),
        ) {
            // Each key's offsets start just above its watermark (-1: none) and rise by 1 to 3.
            let mut last = stored.clone();
            let spec: Spec = steps
                .iter()
                .map(|&(g, p, step, dead)| {
                    let offset = last.get(&(g, p)).copied().unwrap_or(-1) + step;
                    last.insert((g, p), offset);
                    (g, p, offset, dead)
                })
                .collect();
            let records = records(&spec);
            let group = epochs(&records, batch_len, per_epoch);
            let plan = plan(group.iter().flatten(), &stored);

            let expected_batches: Vec<Vec<usize>> = group
                .iter()
                .flatten()
                .map(|b| b.iter().filter(|e| matches!(e.item, Item::Metric(_))).map(id).collect::<Vec<_>>())
                .filter(|b| !b.is_empty())
                .collect();
            let batches: Vec<Vec<usize>> = plan.batches.iter().map(|b| b.iter().map(|e| id(e)).collect()).collect();
            prop_assert_eq!(batches, expected_batches);
            let letters: Vec<usize> = spec.iter().enumerate().filter(|(_, s)| s.3).map(|(i, _)| i).collect();
            prop_assert_eq!(passed(&plan).1, letters);
            prop_assert_eq!(plan.skipped, 0);
            prop_assert_eq!(plan.rows as usize, spec.iter().filter(|s| !s.3).count());
            let raised: FastMap<(u16, i32), i64> = spec.iter().map(|s| ((s.0, s.1), s.2)).collect();
            prop_assert_eq!(plan.watermarks, raised);
        }

        /// Whatever the records and watermarks, a record passes exactly when its offset is
        /// above its stored watermark and above every offset of its key that passed before
        /// it in the same plan; the new watermarks are the highest offsets that passed.
        /// Catches a record at or below its watermark being written (a duplicate row), a
        /// new record being dropped (a lost row), and a message sent twice in one
        /// transaction being written twice.
        #[test]
        fn a_record_at_or_below_its_watermark_never_passes(
            spec in any_spec(),
            stored in any_watermarks(),
            (batch_len, per_epoch) in (1usize..8, 1usize..4),
        ) {
            let records = records(&spec);
            let group = epochs(&records, batch_len, per_epoch);
            let plan = plan(group.iter().flatten(), &stored);
            let (rows, letters) = passed(&plan);
            prop_assert!(rows.windows(2).all(|w| w[0] < w[1]), "rows out of order: {:?}", rows);
            prop_assert!(letters.windows(2).all(|w| w[0] < w[1]), "dead letters out of order: {:?}", letters);
            prop_assert!(plan.batches.iter().all(|b| !b.is_empty()));
            let passed: std::collections::HashSet<usize> = rows.iter().chain(&letters).copied().collect();

            let mut high = stored.clone();
            let mut raised = FastMap::default();
            for (i, &(g, p, offset, _)) in spec.iter().enumerate() {
                let bar = high.get(&(g, p)).copied().unwrap_or(-1);
                if passed.contains(&i) {
                    prop_assert!(offset > bar, "record {} (offset {}) passed at or below {}", i, offset, bar);
                    high.insert((g, p), offset);
                    raised.insert((g, p), offset);
                } else {
                    prop_assert!(offset <= bar, "record {} (offset {}) above {} was dropped", i, offset, bar);
                }
            }
            prop_assert_eq!(plan.skipped as usize, spec.len() - passed.len());
            prop_assert_eq!(plan.rows as usize, rows.len());
            prop_assert_eq!(plan.watermarks, raised);
        }

        /// Planning epochs in one transaction, or in two with the first one's watermarks
        /// carried over (what the writer does between transactions), passes the same
        /// records and ends at the same watermarks: merging queued epochs into one
        /// transaction cannot change what is written.
        #[test]
        fn one_transaction_or_two_pass_the_same_records(
            spec in any_spec(),
            stored in any_watermarks(),
            (batch_len, per_epoch) in (1usize..8, 1usize..4),
            cut in 0usize..=20,
        ) {
            let records = records(&spec);
            let group = epochs(&records, batch_len, per_epoch);
            let cut = cut.min(group.len());
            let whole = plan(group.iter().flatten(), &stored);

            let first = plan(group[..cut].iter().flatten(), &stored);
            let mut between = stored.clone();
            between.extend(first.watermarks.iter().map(|(k, v)| (*k, *v)));
            let second = plan(group[cut..].iter().flatten(), &between);
            let (mut rows, mut letters) = passed(&first);
            let (rows2, letters2) = passed(&second);
            rows.extend(rows2);
            letters.extend(letters2);
            prop_assert_eq!((rows, letters), passed(&whole));
            prop_assert_eq!(first.skipped + second.skipped, whole.skipped);

            let mut split_end = between;
            split_end.extend(second.watermarks.iter().map(|(k, v)| (*k, *v)));
            let mut whole_end = stored.clone();
            whole_end.extend(whole.watermarks.iter().map(|(k, v)| (*k, *v)));
            prop_assert_eq!(split_end, whole_end);
        }
    }
}
