//! The epoch writer: one async task per sink worker, owning one database connection.
//!
//! For each group of epochs it receives it opens one transaction, writes every batch with
//! binary COPY, inserts the dead letters, raises the (key group, partition) watermarks, and
//! commits. Because the watermarks move in the same transaction as the rows, a message
//! replayed after a crash is recognised (offset at or below its watermark) and dropped,
//! whatever the worker count of the run that wrote it. When the database goes away the task
//! reconnects with backoff, re-reads the watermarks (the last commit may or may not have
//! landed) and retries the same epochs; the dataflow waits meanwhile, which is what
//! throttles the sources.

use std::sync::Arc;

use futures_util::pin_mut;
use serde::ser::{Serialize, SerializeMap, Serializer};
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};
use tokio_postgres::{Client, Transaction};

use super::offsets::load_watermarks;
use super::rollups::RollupDelta;
use super::{backoff, connect, FastMap, SinkError};
use crate::envelope::{Envelope, Item};
use crate::record::Metric;
use crate::stats::Stats;

/// Rows merged into one transaction at most, when several epochs are ready at once.
const MAX_ROWS_PER_TRANSACTION: usize = 50_000;

const COPY_METRICS: &str =
    "COPY metrics (time, server_id, cpu, ram, extra, kafka_partition, kafka_offset) FROM STDIN (FORMAT binary)";
const COPY_STAGING: &str =
    "COPY fleetflow_staging (time, server_id, cpu, ram, extra, kafka_partition, kafka_offset) FROM STDIN (FORMAT binary)";
/// Per connection, for `--dedup natural-key`: rows go here first, then into metrics
/// unless their (server_id, time) is already there.
const CREATE_STAGING: &str = "CREATE TEMP TABLE fleetflow_staging (LIKE metrics) ON COMMIT DELETE ROWS";
const INSERT_FROM_STAGING: &str =
    "INSERT INTO metrics SELECT * FROM fleetflow_staging ON CONFLICT (server_id, time) DO NOTHING \
     RETURNING server_id, time, cpu, ram";
const COPY_TYPES: [Type; 7] =
    [Type::TIMESTAMPTZ, Type::TEXT, Type::FLOAT8, Type::FLOAT8, Type::JSONB, Type::INT4, Type::INT8];

/// What a writer needs to know.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    pub database_url: String,
    pub topic: String,
    /// This worker's global index, and how many workers the job has.
    pub worker: usize,
    pub workers: usize,
    /// This writer's connection among the worker's `connections`: it writes the key groups
    /// [`crate::partitioning::connection_key_groups`] gives it.
    pub connection: usize,
    pub connections: usize,
    /// When set, record which serverIds each transaction wrote, under this run id.
    pub audit_run: Option<String>,
    /// Write through a staging table with `ON CONFLICT (server_id, time) DO NOTHING`.
    pub natural_key: bool,
    /// Maintain the per-minute rollups in the same transaction (see `sink::rollups`).
    pub rollups: bool,
}

/// One epoch's rows for this worker, already cut into COPY batches.
#[derive(Debug)]
pub struct EpochWrite {
    pub epoch: u64,
    pub batches: Vec<Vec<Envelope>>,
}

impl EpochWrite {
    fn len(&self) -> usize {
        self.batches.iter().map(Vec::len).sum()
    }
}

/// Starts the writer task. `on_durable(epoch)` is called, in epoch order, once the epoch's
/// rows are committed.
pub fn spawn_writer(
    runtime: &tokio::runtime::Handle,
    settings: WriterSettings,
    stats: Arc<Stats>,
    on_durable: impl Fn(u64) + Send + 'static,
) -> mpsc::UnboundedSender<EpochWrite> {
    let (tx, mut rx) = mpsc::unbounded_channel::<EpochWrite>();
    runtime.spawn(async move {
        let mut writer = Writer { settings, stats, client: None, watermarks: FastMap::default(), waiting: false };
        while let Some(first) = rx.recv().await {
            // Epochs that queued up while the last transaction ran go into one transaction.
            let mut group = vec![first];
            let mut rows = group[0].len();
            while rows < MAX_ROWS_PER_TRANSACTION {
                match rx.try_recv() {
                    Ok(next) => {
                        rows += next.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            writer.write_until_durable(&group).await;
            for write in &group {
                on_durable(write.epoch);
            }
        }
    });
    tx
}

struct Writer {
    settings: WriterSettings,
    stats: Arc<Stats>,
    client: Option<Client>,
    /// (key group, partition) -> highest offset durably written, for the key groups this
    /// worker owns. Valid only while `client` is: reloaded after every reconnect.
    watermarks: FastMap<(u16, i32), i64>,
    /// Whether this writer is waiting for the database (see `Stats::database_waiting`).
    waiting: bool,
}

/// What a transaction will write once replayed messages are removed.
#[derive(Default)]
struct Plan<'a> {
    batches: Vec<Vec<&'a Envelope>>,
    dead_letters: Vec<&'a Envelope>,
    watermarks: FastMap<(u16, i32), i64>,
    skipped: u64,
    rows: u64,
}

impl Writer {
    async fn write_until_durable(&mut self, group: &[EpochWrite]) {
        let mut attempt = 0u32;
        loop {
            match self.try_write(group).await {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(
                            worker = self.settings.worker,
                            connection = self.settings.connection,
                            attempt,
                            "database is back; write committed"
                        );
                        self.stats.database_waiting.set(&mut self.waiting, false);
                    }
                    return;
                }
                Err(e) => {
                    Stats::add(&self.stats.database_errors, 1);
                    self.stats.database_waiting.set(&mut self.waiting, true);
                    let level_is_warn = e.is_transient();
                    if level_is_warn {
                        tracing::warn!(worker = self.settings.worker, connection = self.settings.connection, attempt, error = %e, "database unavailable; waiting to write");
                    } else {
                        tracing::error!(worker = self.settings.worker, connection = self.settings.connection, attempt, error = %e, "write failed; retrying");
                    }
                    self.client = None;
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn try_write(&mut self, group: &[EpochWrite]) -> Result<(), SinkError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let client = connect(&self.settings.database_url).await?;
            let s = &self.settings;
            let owned = crate::partitioning::connection_key_groups(s.worker, s.workers, s.connection, s.connections);
            self.watermarks = load_watermarks(&client, &self.settings.topic, &owned).await?;
            if self.settings.natural_key {
                client.batch_execute(CREATE_STAGING).await?;
            }
            self.client = Some(client);
        }
        let plan = plan(group, &self.watermarks);
        let started = std::time::Instant::now();
        let client = self.client.as_mut().expect("connected above");
        let tx = client.transaction().await?;
        let copy = if self.settings.natural_key { COPY_STAGING } else { COPY_METRICS };
        for batch in &plan.batches {
            copy_batch(&tx, copy, batch).await?;
        }
        let mut rows = plan.rows;
        // With --dedup natural-key only the rows that were new count, in the rows and in
        // the rollups.
        let mut inserted = Vec::new();
        if self.settings.natural_key && rows > 0 {
            inserted = tx.query(INSERT_FROM_STAGING, &[]).await?.iter().map(inserted_metric).collect();
            rows = inserted.len() as u64;
        }
        let mut rollup = RollupDelta::default();
        if self.settings.rollups {
            if self.settings.natural_key {
                inserted.iter().for_each(|m| rollup.add(m));
            } else {
                for env in plan.batches.iter().flatten() {
                    if let Item::Metric(m) = &env.item {
                        rollup.add(m);
                    }
                }
            }
        }
        // Each connection of each worker has its own histogram shard.
        let shard = (self.settings.worker * self.settings.connections + self.settings.connection) as i32;
        rollup.apply(&tx, shard).await?;
        insert_dead_letters(&tx, &self.settings.topic, &plan.dead_letters).await?;
        raise_watermarks(&tx, &self.settings.topic, &plan.watermarks).await?;
        if let Some(run) = &self.settings.audit_run {
            audit(&tx, run, self.settings.worker, &plan.batches).await?;
        }
        tx.commit().await?;

        self.stats.copy_seconds.observe(started.elapsed().as_secs_f64());
        self.watermarks.extend(plan.watermarks);
        Stats::add(&self.stats.rows_written, rows);
        Stats::add(&self.stats.natural_key_duplicates, plan.rows - rows);
        Stats::add(&self.stats.dead_letters_written, plan.dead_letters.len() as u64);
        Stats::add(&self.stats.replayed_skipped, plan.skipped);
        Stats::add(&self.stats.transactions, 1);
        self.stats.mark_write();
        Ok(())
    }
}

/// A row `INSERT_FROM_STAGING` returned, as what the rollups fold in.
fn inserted_metric(row: &tokio_postgres::Row) -> Metric {
    Metric {
        server_id: row.get(0),
        time_us: row.get::<_, chrono::DateTime<chrono::Utc>>(1).timestamp_micros(),
        cpu: row.get(2),
        ram: row.get(3),
        extra: Vec::new(),
    }
}

/// Drops every message at or below its (key group, partition) watermark and computes the
/// new watermarks.
fn plan<'a>(group: &'a [EpochWrite], watermarks: &FastMap<(u16, i32), i64>) -> Plan<'a> {
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

/// Writes metric rows with binary COPY, in batches of 1,000 and transactions of
/// [`MAX_ROWS_PER_TRANSACTION`], with no bookkeeping: the database ceiling of `bench`.
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
struct ExtraFields<'a>(&'a [(String, f64)]);

impl Serialize for ExtraFields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

async fn copy_batch(tx: &Transaction<'_>, statement: &str, batch: &[&Envelope]) -> Result<(), SinkError> {
    let sink = tx.copy_in(statement).await?;
    let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    pin_mut!(writer);
    for env in batch {
        let Item::Metric(m) = &env.item else { continue };
        let time = chrono::DateTime::from_timestamp_micros(m.time_us).unwrap_or_default();
        let extra = (!m.extra.is_empty()).then(|| Json(ExtraFields(&m.extra)));
        let row: [&(dyn ToSql + Sync); 7] = [&time, &m.server_id, &m.cpu, &m.ram, &extra, &env.partition, &env.offset];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    Ok(())
}

async fn insert_dead_letters(tx: &Transaction<'_>, topic: &str, letters: &[&Envelope]) -> Result<(), SinkError> {
    if letters.is_empty() {
        return Ok(());
    }
    let statement = tx
        .prepare(
            "INSERT INTO fleetflow_dead_letters (topic, partition, \"offset\", key, raw, kind, reason, message_time)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await?;
    for env in letters {
        let Item::DeadLetter(d) = &env.item else {
            continue;
        };
        let time = d.message_time_ms.and_then(chrono::DateTime::from_timestamp_millis);
        tx.execute(&statement, &[&topic, &env.partition, &env.offset, &d.key, &d.raw, &d.kind, &d.reason, &time])
            .await?;
    }
    Ok(())
}

async fn raise_watermarks(
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

async fn audit(tx: &Transaction<'_>, run: &str, worker: usize, batches: &[Vec<&Envelope>]) -> Result<(), SinkError> {
    let mut per_server: FastMap<&str, i32> = FastMap::default();
    for env in batches.iter().flatten() {
        if let Item::Metric(m) = &env.item {
            *per_server.entry(m.server_id.as_str()).or_default() += 1;
        }
    }
    let servers: Vec<&str> = per_server.keys().copied().collect();
    let rows: Vec<i32> = servers.iter().map(|s| per_server[s]).collect();
    tx.execute(
        "INSERT INTO fleetflow_audit (run_id, worker, server_id, rows)
         SELECT $1, $2, s, r FROM unnest($3::text[], $4::int[]) AS t(s, r)",
        &[&run, &(worker as i32), &servers, &rows],
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
