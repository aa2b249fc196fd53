//! The epoch writer: one async task per sink worker connection. Each piece of a write has a
//! module of its own; this one puts them in one transaction and decides what a failure means.
//!
//! For each group of epochs it receives it opens one transaction, checks that this job still
//! holds the topic (see `sink::fence`), drops replayed messages (see `sink::watermarks`),
//! writes every batch with binary COPY (`sink::copy`), folds the rollups (`sink::rollups`),
//! writes the dead letters (`sink::dead_letters`), raises the (key group, partition)
//! watermarks, records the `--audit` rows (`sink::audit`), and commits. Because the
//! watermarks move in the same transaction as the rows, a message replayed after a crash is
//! recognised (offset at or below its watermark) and dropped, whatever the worker count of
//! the run that wrote it.
//!
//! What goes wrong, and what the writer does:
//! - The database goes away or stops answering (`--database-timeout`): reconnect with
//!   backoff, wait until the old session is gone (it could still commit the transaction we
//!   gave up on), re-read the watermarks and retry the same epochs. The dataflow waits
//!   meanwhile, which is what throttles the sources.
//! - The database refuses the data (SQLSTATE class 22 or 23: a value it cannot store, a
//!   constraint): retry the group once with each batch under a savepoint, bisecting a batch
//!   that fails down to the rows that cause it. Those rows become dead letters with the
//!   database's own words; everything else is written, in the same exactly-once transaction.
//! - Anything else (an error that cannot be pinned on rows, another job took the topic):
//!   the process stops with one line. Nothing of the group was committed; it is read again
//!   on the next start.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{Client, Transaction};

use super::audit::audit;
use super::copy::{copy_batch, COPY_METRICS, COPY_STAGING, MAX_ROWS_PER_TRANSACTION};
use super::dead_letters::{copy_dead_letters, rejected_row, DeadLetterRow};
use super::rollups::RollupDelta;
use super::watermarks::{load_watermarks, plan, raise_watermarks};
use super::{backoff, connect_as, is_data_error, FastMap, SinkError};
use crate::alerts::window::{AlertTap, CommittedMinutes};
use crate::envelope::{DeadLetter, Envelope, Item};
use crate::stats::Stats;

/// Per connection, for `--dedup natural-key`: rows go here first, then into metrics
/// unless their (server_id, time) is already there.
const CREATE_STAGING: &str = "CREATE TEMP TABLE fleetflow_staging (LIKE metrics) ON COMMIT DELETE ROWS";
/// Returns where each new row came from: the rows themselves are in the writer's hands.
const INSERT_FROM_STAGING: &str =
    "INSERT INTO metrics SELECT * FROM fleetflow_staging ON CONFLICT (server_id, time) DO NOTHING \
     RETURNING kafka_partition, kafka_offset";

/// What a writer needs to know.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    pub database_url: String,
    pub topic: String,
    /// This worker's global index, and how many workers the job has.
    pub worker: usize,
    pub workers: usize,
    /// This writer's connection among the worker's `connections`: it writes the key groups
    /// [`fleetflow_dataflows::routing::connection_key_groups`] gives it.
    pub connection: usize,
    pub connections: usize,
    /// When set, record which serverIds each transaction wrote, under this run id.
    pub audit_run: Option<String>,
    /// Write through a staging table with `ON CONFLICT (server_id, time) DO NOTHING`.
    pub natural_key: bool,
    /// Maintain the per-minute rollups in the same transaction (see `sink::rollups`).
    pub rollups: bool,
    /// The job's fencing generation (see `sink::fence`); checked by every transaction.
    pub generation: i64,
    /// A database call of a write (each statement, the commit, a reconnect) that takes longer
    /// means the database or the session hung.
    pub timeout: Duration,
    /// With alert rules: where what each transaction committed goes (see `alerts::window`).
    pub alerts: Option<AlertTap>,
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
        let mut writer = Writer {
            settings,
            stats,
            client: None,
            session: None,
            stale_session: None,
            watermarks: FastMap::default(),
            waiting: false,
            not_answering: false,
            uncertain: None,
        };
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

/// A database session, identified across reconnects (pids are reused, start times are not).
#[derive(Clone, Copy, Debug)]
struct Session {
    pid: i32,
    started: chrono::DateTime<chrono::Utc>,
}

struct Writer {
    settings: WriterSettings,
    stats: Arc<Stats>,
    client: Option<Client>,
    /// The session behind `client`.
    session: Option<Session>,
    /// A session we gave up on that may still be running (and could even commit) our last
    /// transaction: the watermarks are re-read only once it is gone.
    stale_session: Option<Session>,
    /// (key group, partition) -> highest offset durably written, for the key groups this
    /// writer owns. Valid only while `client` is: reloaded after every reconnect.
    watermarks: FastMap<(u16, i32), i64>,
    /// Whether this writer is waiting for the database (see `Stats::database_waiting`).
    waiting: bool,
    /// Whether the database stopped answering this writer (see `Stats::database_not_answering`).
    not_answering: bool,
    /// With alert rules: what an attempt whose commit failed told the rules nothing of (the
    /// minutes it wrote) and the watermarks it raised. The commit may have landed: then the
    /// next attempt skips those rows, but the rules must still hear of them.
    uncertain: Option<UncertainCommit>,
}

/// The minutes a commit that failed without an answer wrote, and the watermarks it raised.
type UncertainCommit = (CommittedMinutes, FastMap<(u16, i32), i64>);

impl Writer {
    async fn write_until_durable(&mut self, group: &[EpochWrite]) {
        let (worker, connection) = (self.settings.worker, self.settings.connection);
        let mut attempt = 0u32;
        let mut isolate = false;
        loop {
            let e = match self.try_write(group, isolate).await {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(worker, connection, attempt, "database is back; write committed");
                    }
                    self.stats.database_waiting.set(&mut self.waiting, false);
                    self.stats.database_not_answering.set(&mut self.not_answering, false);
                    return;
                }
                Err(e) => e,
            };
            Stats::add(&self.stats.database_errors, 1);
            if let SinkError::Fenced(line) = &e {
                crate::exit::exit_with(crate::exit::Exit::Fenced, line);
            }
            if is_data_error(&e) && !isolate {
                // The transaction rolled back; the connection is fine. Find the rows.
                tracing::warn!(worker, connection, error = %e, "the database refused rows of this write; finding them");
                isolate = true;
                continue;
            }
            if !e.is_transient() {
                crate::exit::exit_with(
                    crate::exit::Exit::Error,
                    &format!(
                        "worker {worker}: the database refused a write for a reason that cannot be pinned on a \
                         record: {e}. Stopping; nothing of it was committed, and it is read again on the next start"
                    ),
                );
            }
            self.stats.database_waiting.set(&mut self.waiting, true);
            if matches!(e, SinkError::Timeout(_)) {
                self.stats.database_not_answering.set(&mut self.not_answering, true);
                tracing::error!(worker, connection, attempt, error = %e, "the database is not answering; retrying on a new connection");
            } else {
                tracing::warn!(worker, connection, attempt, error = %e, "database unavailable; waiting to write");
            }
            if self.client.take().is_some() {
                self.stale_session = self.session.take();
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// Connects, waits for a stale session to end, and loads the watermarks.
    async fn reconnect(&mut self) -> Result<(), SinkError> {
        let s = &self.settings;
        let client = connect_as(&s.database_url, &super::fence::session_tag(&s.topic)).await?;
        let timeout_ms = s.timeout.as_millis().max(1);
        client.batch_execute(&format!("SET statement_timeout = {timeout_ms}")).await?;
        if let Some(stale) = self.stale_session {
            wait_for_session_end(&client, stale).await?;
            self.stale_session = None;
        }
        let row = client
            .query_one("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()", &[])
            .await?;
        let session = Session { pid: row.get(0), started: row.get(1) };
        let owned =
            fleetflow_dataflows::routing::connection_key_groups(s.worker, s.workers, s.connection, s.connections);
        self.watermarks = load_watermarks(&client, &s.topic, &owned).await?;
        if s.natural_key {
            client.batch_execute(CREATE_STAGING).await?;
        }
        self.client = Some(client);
        self.session = Some(session);
        Ok(())
    }

    async fn try_write(&mut self, group: &[EpochWrite], isolate: bool) -> Result<(), SinkError> {
        let t = self.settings.timeout;
        if self.client.as_ref().is_none_or(Client::is_closed) {
            within(t, self.reconnect()).await?;
        }
        // The transaction is atomic and only this writer raises these watermarks: the failed
        // commit landed exactly when the (reloaded) watermarks hold all it raised.
        if let (Some((minutes, raised)), Some(tap)) = (self.uncertain.take(), &self.settings.alerts) {
            if raised.iter().all(|(key, offset)| self.watermarks.get(key).is_some_and(|w| w >= offset)) {
                tap.send(minutes);
            }
        }
        let plan = plan(group.iter().flat_map(|w| &w.batches), &self.watermarks);
        let started = std::time::Instant::now();
        let settings = &self.settings;
        let client = self.client.as_mut().expect("connected above");
        let tx = within(t, client.transaction()).await?;
        within(t, super::fence::check(&tx, &settings.topic, settings.generation)).await?;
        let copy = if settings.natural_key { COPY_STAGING } else { COPY_METRICS };
        // Rows the database refused (only when isolating), and with --dedup natural-key the
        // positions of the rows that were new: only those count, in the rows, the rollups and
        // the alert rules.
        let mut refused: Vec<(&Envelope, String)> = Vec::new();
        let mut inserted: Positions = Positions::default();
        if isolate {
            for batch in &plan.batches {
                write_isolating(&tx, t, copy, settings.natural_key, batch, &mut refused, &mut inserted).await?;
            }
        } else {
            let rows: Vec<&Envelope> = plan.batches.iter().flatten().copied().collect();
            within(t, copy_batch(&tx, copy, &rows)).await?;
            if settings.natural_key && plan.rows > 0 {
                inserted.extend(within(t, tx.query(INSERT_FROM_STAGING, &[])).await?.iter().map(position));
            }
        }
        let refused_positions: Positions = refused.iter().map(|(e, _)| (e.partition, e.offset)).collect();
        let natural_key = settings.natural_key;
        // Almost always nothing was refused: then no row pays for a lookup.
        let written = |env: &&&Envelope| {
            refused_positions.is_empty() || !refused_positions.contains(&(env.partition, env.offset))
        };
        // What counts: written and, with --dedup natural-key, new.
        let counted =
            |env: &&&Envelope| written(env) && (!natural_key || inserted.contains(&(env.partition, env.offset)));
        let new_metrics = || {
            plan.batches.iter().flatten().filter(counted).filter_map(|env| match &env.item {
                Item::Metric(m) => Some(m),
                Item::DeadLetter(_) => None,
            })
        };
        let rows = if natural_key { inserted.len() as u64 } else { plan.rows - refused.len() as u64 };
        let mut rollup = RollupDelta::default();
        if settings.rollups {
            new_metrics().for_each(|m| rollup.add(m));
        }
        // Each connection of each worker has its own histogram shard.
        let shard = (settings.worker * settings.connections + settings.connection) as i32;
        within(t, rollup.apply(&tx, shard)).await?;
        let refused_letters: Vec<(&Envelope, DeadLetter)> = refused
            .into_iter()
            .filter_map(|(env, reason)| match &env.item {
                Item::Metric(m) => Some((env, rejected_row(m, reason))),
                Item::DeadLetter(_) => None,
            })
            .collect();
        let mut letters: Vec<DeadLetterRow> = plan
            .dead_letters
            .iter()
            .filter_map(|env| match &env.item {
                Item::DeadLetter(d) => Some(DeadLetterRow { partition: env.partition, offset: env.offset, letter: d }),
                Item::Metric(_) => None,
            })
            .collect();
        letters.extend(refused_letters.iter().map(|(env, d)| DeadLetterRow {
            partition: env.partition,
            offset: env.offset,
            letter: d,
        }));
        within(t, copy_dead_letters(&tx, &settings.topic, &letters)).await?;
        within(t, raise_watermarks(&tx, &settings.topic, &plan.watermarks)).await?;
        if let Some(run) = &settings.audit_run {
            let batches: Vec<Vec<&Envelope>> =
                plan.batches.iter().map(|b| b.iter().filter(written).copied().collect()).collect();
            within(t, audit(&tx, run, settings.worker, &batches)).await?;
        }
        // What the alert rules read: the rows this transaction writes (folded before the
        // commit, while the rows are borrowed; handed over once it committed, or once the
        // next attempt finds that a commit which failed without an answer landed).
        let committed_minutes = settings.alerts.as_ref().map(|tap| tap.fold(new_metrics()));
        if let Err(e) = within(t, tx.commit()).await {
            self.uncertain = committed_minutes.map(|minutes| (minutes, plan.watermarks));
            return Err(e);
        }
        if let (Some(tap), Some(minutes)) = (&settings.alerts, committed_minutes) {
            tap.send(minutes);
        }

        // One line per transaction, not per row: a constraint that refuses everything must
        // not flood the log.
        if let Some((env, d)) = refused_letters.first() {
            tracing::warn!(
                worker = settings.worker,
                refused = refused_letters.len(),
                partition = env.partition,
                offset = env.offset,
                reason = %d.reason,
                "the database refused records; they are dead letters (the first one is shown)"
            );
        }
        self.stats.copy_seconds.observe(started.elapsed().as_secs_f64());
        self.watermarks.extend(plan.watermarks);
        Stats::add(&self.stats.rows_written, rows);
        Stats::add(&self.stats.natural_key_duplicates, plan.rows - refused_letters.len() as u64 - rows);
        Stats::add(&self.stats.dead_letters_written, letters.len() as u64);
        Stats::add(&self.stats.rejected_by_database, refused_letters.len() as u64);
        Stats::add(&self.stats.replayed_skipped, plan.skipped);
        Stats::add(&self.stats.transactions, 1);
        self.stats.mark_write();
        Ok(())
    }
}

/// Waits until a session we gave up on has ended, asking the server to end it. While it
/// lives it may hold row locks of, or still commit, the transaction we abandoned: planning
/// from the watermarks before it is gone could write its rows a second time.
async fn wait_for_session_end(client: &Client, stale: Session) -> Result<(), SinkError> {
    const ALIVE: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2";
    let mut said = false;
    while !client.query(ALIVE, &[&stale.pid, &stale.started]).await?.is_empty() {
        if !said {
            tracing::warn!(pid = stale.pid, "waiting for the database session that stopped answering to end");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Writes one batch under savepoints, bisecting a part the database refuses for its data
/// until the refused rows are found one by one. Refused rows are returned with the
/// database's reason; everything else is written.
async fn write_isolating<'a>(
    tx: &Transaction<'_>,
    t: Duration,
    copy: &str,
    natural_key: bool,
    batch: &[&'a Envelope],
    refused: &mut Vec<(&'a Envelope, String)>,
    inserted: &mut Positions,
) -> Result<(), SinkError> {
    let mut parts = vec![batch];
    while let Some(part) = parts.pop() {
        within(t, tx.batch_execute("SAVEPOINT fleetflow_part")).await?;
        let result = async {
            within(t, copy_batch(tx, copy, part)).await?;
            if natural_key {
                let new = within(t, tx.query(INSERT_FROM_STAGING, &[])).await?;
                let new: Vec<(i32, i64)> = new.iter().map(position).collect();
                within(t, tx.batch_execute("DELETE FROM fleetflow_staging")).await?;
                return Ok(new);
            }
            Ok::<_, SinkError>(Vec::new())
        }
        .await;
        match result {
            Ok(new) => {
                within(t, tx.batch_execute("RELEASE SAVEPOINT fleetflow_part")).await?;
                inserted.extend(new);
            }
            Err(e) if is_data_error(&e) => {
                within(t, tx.batch_execute("ROLLBACK TO SAVEPOINT fleetflow_part")).await?;
                if let [one] = part {
                    refused.push((one, format!("the database refused the record: {}", describe(&e))));
                } else {
                    let (left, right) = part.split_at(part.len() / 2);
                    // Popped left first, so rows keep their order.
                    parts.push(right);
                    parts.push(left);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs one database call (or the reconnect), giving up after `limit`: past it the database
/// or the session hung. Per call, not per transaction: a large transaction that is bisecting
/// refused rows makes progress call by call and must not be cut short as a whole.
pub(crate) async fn within<T, E: Into<SinkError>>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, SinkError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(SinkError::Timeout(limit)),
    }
}

/// The database's words for a refused row (without our "database error:" prefix).
fn describe(e: &SinkError) -> String {
    match e {
        SinkError::Db(e) => super::describe_db_error(e),
        other => other.to_string(),
    }
}

/// (partition, offset) of rows: where they came from in Kafka.
type Positions = fnv::FnvHashSet<(i32, i64)>;

/// A row `INSERT_FROM_STAGING` returned: the position of a new row.
fn position(row: &tokio_postgres::Row) -> (i32, i64) {
    (row.get(0), row.get(1))
}
