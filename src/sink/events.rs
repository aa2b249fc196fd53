//! Partition events: what the job found out about its topic that an operator must hear of,
//! kept in the database so that `fleetflow status` shows it after the fact: offsets deleted
//! by retention before the job read them, partitions that could not be read, partitions
//! added to the topic, a topic started over (`--on-topic-reset start-over`), and the line
//! the job stopped with.
//!
//! Events are bookkeeping for people, written next to the data, not with it: best effort, and
//! a crash can repeat one. Skipped offsets are an exception worth counting exactly: a gap
//! found again after a restart is recorded only where it goes beyond what was recorded.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::SinkError;

/// The table (schema migration 4).
pub const MIGRATION: &str = r#"
    -- What the job found about the topic's partitions (see sink::events).
    CREATE TABLE fleetflow_partition_events (
        id          bigserial   PRIMARY KEY,
        at          timestamptz NOT NULL DEFAULT now(),
        topic       text        NOT NULL,
        partition   integer     NOT NULL,
        kind        text        NOT NULL,
        from_offset bigint,
        to_offset   bigint,
        detail      text        NOT NULL
    );
    CREATE INDEX ON fleetflow_partition_events (topic, partition, kind);
"#;

/// What happened to a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Offsets `from..to` were deleted by retention before the job read them.
    Skipped,
    /// The partition had messages to read and delivered none for a while.
    Stalled,
    /// The partition delivers messages again.
    Recovered,
    /// The partition was added to the topic while the job ran, and is read from `from`.
    Added,
    /// The operator started the topic over (`--on-topic-reset start-over`): its old offsets
    /// and watermarks were forgotten.
    StartedOver,
    /// The topic was deleted and recreated or truncated (found at start or while running);
    /// the job refuses to go on until started over.
    Reset,
    /// The job stopped because of the partition (the detail is its last line).
    Stopped,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Skipped => "skipped",
            EventKind::Stalled => "stalled",
            EventKind::Recovered => "recovered",
            EventKind::Added => "added",
            EventKind::StartedOver => "started-over",
            EventKind::Reset => "reset",
            EventKind::Stopped => "stopped",
        }
    }
}

/// One event to record.
#[derive(Clone, Debug)]
pub struct Event {
    pub partition: i32,
    pub kind: EventKind,
    pub range: Option<(i64, i64)>,
    pub detail: String,
}

/// Records an event. Skipped ranges are clipped to what no earlier event (since the topic was
/// last started over) recorded, so a gap found again after a restart is not counted twice.
pub async fn record(client: &Client, topic: &str, event: &Event) -> Result<(), SinkError> {
    let (from, to) = event.range.unzip();
    if event.kind == EventKind::Skipped {
        client
            .execute(
                "INSERT INTO fleetflow_partition_events (topic, partition, kind, from_offset, to_offset, detail)
                 SELECT $1, $2, 'skipped', f, $4, $5
                 FROM (SELECT greatest($3::bigint, max(to_offset)) AS f FROM fleetflow_partition_events
                       WHERE topic = $1 AND partition = $2 AND kind = 'skipped'
                         AND id > coalesce((SELECT max(id) FROM fleetflow_partition_events
                                            WHERE topic = $1 AND partition = $2 AND kind = 'started-over'), 0)) s
                 WHERE f < $4",
                &[&topic, &event.partition, &from, &to, &event.detail],
            )
            .await?;
    } else {
        client
            .execute(
                "INSERT INTO fleetflow_partition_events (topic, partition, kind, from_offset, to_offset, detail)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&topic, &event.partition, &event.kind.as_str(), &from, &to, &event.detail],
            )
            .await?;
    }
    Ok(())
}

/// Forgets the topic's progress so the job reads it again from `starts` (partition, low
/// watermark): the committed offsets become the starts, the exactly-once watermarks go, and
/// an event says so. One transaction, checked against the job's fencing generation.
pub async fn start_over(
    client: &mut Client,
    topic: &str,
    generation: i64,
    starts: &[(i32, i64)],
) -> Result<(), SinkError> {
    let tx = client.transaction().await?;
    super::fence::check(&tx, topic, generation).await?;
    tx.execute("DELETE FROM fleetflow_watermarks WHERE topic = $1", &[&topic]).await?;
    tx.execute("DELETE FROM fleetflow_fnv_watermarks WHERE topic = $1", &[&topic]).await?;
    tx.execute("DELETE FROM fleetflow_offsets WHERE topic = $1", &[&topic]).await?;
    let partitions: Vec<i32> = starts.iter().map(|s| s.0).collect();
    let offsets: Vec<i64> = starts.iter().map(|s| s.1).collect();
    tx.execute(
        "INSERT INTO fleetflow_offsets (topic, partition, next_offset)
         SELECT $1, p, n FROM unnest($2::int[], $3::bigint[]) AS t(p, n)",
        &[&topic, &partitions, &offsets],
    )
    .await?;
    tx.execute(
        "INSERT INTO fleetflow_partition_events (topic, partition, kind, from_offset, detail)
         SELECT $1, p, 'started-over', n,
                '--on-topic-reset start-over: old offsets and exactly-once watermarks forgotten; read again from offset ' || n
         FROM unnest($2::int[], $3::bigint[]) AS t(p, n)",
        &[&topic, &partitions, &offsets],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A recorded event, for `status`.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub at: chrono::DateTime<chrono::Utc>,
    pub partition: i32,
    pub kind: String,
    pub range: Option<(i64, i64)>,
    pub detail: String,
}

/// The topic's newest events, newest first.
pub async fn recent(client: &Client, topic: &str, limit: i64) -> Result<Vec<Recorded>, SinkError> {
    let rows = client
        .query(
            "SELECT at, partition, kind, from_offset, to_offset, detail FROM fleetflow_partition_events
             WHERE topic = $1 ORDER BY id DESC LIMIT $2",
            &[&topic, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Recorded {
            at: r.get(0),
            partition: r.get(1),
            kind: r.get(2),
            range: r.get::<_, Option<i64>>(3).zip(r.get::<_, Option<i64>>(4)),
            detail: r.get(5),
        })
        .collect())
}

/// Offsets skipped per partition (deleted by retention before the job read them) since the
/// topic was last started over.
pub async fn skipped(client: &Client, topic: &str) -> Result<BTreeMap<i32, i64>, SinkError> {
    let rows = client
        .query(
            "SELECT e.partition, sum(e.to_offset - e.from_offset)::bigint FROM fleetflow_partition_events e
             WHERE e.topic = $1 AND e.kind = 'skipped'
               AND e.id > coalesce((SELECT max(id) FROM fleetflow_partition_events r
                                    WHERE r.topic = e.topic AND r.partition = e.partition AND r.kind = 'started-over'), 0)
             GROUP BY e.partition",
            &[&topic],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Records events from a background task, so that a worker never waits on the database for
/// bookkeeping. Best effort: an event that cannot be written is logged and dropped.
#[derive(Clone)]
pub struct EventLog {
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
}

impl EventLog {
    pub fn spawn(runtime: &tokio::runtime::Handle, url: String, topic: String) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        runtime.spawn(async move {
            let mut client: Option<Client> = None;
            while let Some(event) = rx.recv().await {
                for attempt in 0..3 {
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        client = super::connect(&url).await.ok();
                    }
                    let result = match &client {
                        Some(c) => record(c, &topic, &event).await,
                        None => Err(SinkError::BadUrl("no connection".into())),
                    };
                    match result {
                        Ok(()) => break,
                        Err(e) if attempt == 2 => {
                            tracing::warn!(error = %e, kind = event.kind.as_str(), partition = event.partition, "cannot record a partition event")
                        }
                        Err(_) => {
                            client = None;
                            tokio::time::sleep(super::backoff(attempt)).await;
                        }
                    }
                }
            }
        });
        EventLog { tx }
    }

    pub fn send(&self, event: Event) {
        // The task lives as long as the runtime; a send fails only during teardown.
        let _ = self.tx.send(event);
    }
}

/// Records one event now (the last one before the job stops), waiting at most `timeout`.
pub fn record_now(
    runtime: &tokio::runtime::Handle,
    url: &str,
    topic: &str,
    event: &Event,
    timeout: std::time::Duration,
) {
    let result = runtime.block_on(async {
        tokio::time::timeout(timeout, async { record(&super::connect(url).await?, topic, event).await }).await
    });
    if !matches!(result, Ok(Ok(()))) {
        tracing::warn!(kind = event.kind.as_str(), partition = event.partition, "cannot record a partition event");
    }
}

/// The detail of a topic reset found earlier and not resolved since by a start-over: a job
/// that found the topic recreated under it leaves this, so that a restart refuses too, even
/// once the new topic has grown past the old committed offsets (which then fit again).
pub async fn pending_reset(client: &Client, topic: &str) -> Result<Option<String>, SinkError> {
    let row = client
        .query_opt(
            "SELECT detail FROM fleetflow_partition_events
             WHERE topic = $1 AND kind = 'reset'
               AND id > coalesce((SELECT max(id) FROM fleetflow_partition_events WHERE topic = $1 AND kind = 'started-over'), 0)
             ORDER BY id DESC LIMIT 1",
            &[&topic],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}
