//! The committed source offsets (`fleetflow_offsets`): where a restarted job resumes reading,
//! per partition, each with its landmark (the message under it, see `kafka::landmarks`). This is the commit stage's database side; what was already written is the
//! watermarks' business (`sink::watermarks`), so offsets may lag the rows without harm.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;
use tokio::sync::mpsc;

use tokio_postgres::{Client, GenericClient};

use super::{backoff, connect_as, SinkError};
use crate::stats::Stats;

/// The message a commit stands on: its offset, its Kafka timestamp (ms) and the hash of its
/// key and value ([`crate::kafka::landmarks::message_hash`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landmark {
    pub offset: i64,
    pub time_ms: i64,
    pub hash: i64,
}

/// Landmarks kept per partition between two commits, at most.
const MAX_LANDMARKS_PER_PARTITION: usize = 1024;

/// Messages the source read, per partition, by the next offset after them; the committer
/// takes the one below each offset it commits. Shared by a worker's source and committer.
#[derive(Debug, Default)]
pub struct Landmarks {
    seen: Mutex<HashMap<i32, BTreeMap<i64, Landmark>>>,
}

impl Landmarks {
    /// The source read the message `mark` of `partition` (the first of each read call and
    /// partition: epochs close between read calls, so every commit has one below it).
    pub fn note(&self, partition: i32, mark: Landmark) {
        if let Ok(mut seen) = self.seen.lock() {
            let marks = seen.entry(partition).or_default();
            marks.insert(mark.offset + 1, mark);
            // A trickle read with a long --commit-interval notes many between two commits;
            // the oldest go first (a commit below all that are left stores no new landmark
            // and keeps the one it had, still a message of the same topic).
            if marks.len() > MAX_LANDMARKS_PER_PARTITION {
                marks.pop_first();
            }
        }
    }

    /// The landmark below each committed offset, when one is known; older ones are forgotten.
    pub fn for_commit(&self, offsets: &[(i32, i64)]) -> Vec<Option<Landmark>> {
        let Ok(mut seen) = self.seen.lock() else { return vec![None; offsets.len()] };
        offsets
            .iter()
            .map(|(partition, next)| {
                let marks = seen.get_mut(partition)?;
                let (&key, &mark) = marks.range(..=*next).next_back()?;
                // Keep this one (a later commit may move without new messages) and newer ones.
                *marks = marks.split_off(&key);
                Some(mark)
            })
            .collect()
    }
}

/// The next offset to read per partition, as committed by earlier runs.
pub async fn load_offsets(client: &Client, topic: &str) -> Result<HashMap<i32, i64>, SinkError> {
    let rows = client.query("SELECT partition, next_offset FROM fleetflow_offsets WHERE topic = $1", &[&topic]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The landmark of each partition's committed offset (see `kafka::landmarks`), where known.
pub async fn load_landmarks(client: &Client, topic: &str) -> Result<Vec<(i32, Landmark)>, SinkError> {
    let rows = client
        .query(
            "SELECT partition, landmark_offset, landmark_time_ms, landmark_hash FROM fleetflow_offsets
             WHERE topic = $1 AND landmark_offset IS NOT NULL AND landmark_time_ms IS NOT NULL
                   AND landmark_hash IS NOT NULL
             ORDER BY partition",
            &[&topic],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), Landmark { offset: r.get(1), time_ms: r.get(2), hash: r.get(3) })).collect())
}

/// Stores offsets, each with its landmark, in a transaction that first checks this job
/// still holds the topic.
async fn store_offsets_fenced(
    client: &mut Client,
    settings: &CommitterSettings,
    commit: &[(i32, i64, Option<Landmark>)],
) -> Result<(), SinkError> {
    let tx = client.transaction().await?;
    super::fence::check(&tx, &settings.topic, settings.generation).await?;
    let offsets: Vec<(i32, i64)> = commit.iter().map(|(p, o, _)| (*p, *o)).collect();
    store_offsets(&tx, &settings.topic, &offsets).await?;
    let marked: Vec<(i32, i64, Landmark)> = commit.iter().filter_map(|(p, o, m)| m.map(|m| (*p, *o, m))).collect();
    if !marked.is_empty() {
        let partitions: Vec<i32> = marked.iter().map(|m| m.0).collect();
        let nexts: Vec<i64> = marked.iter().map(|m| m.1).collect();
        let offsets: Vec<i64> = marked.iter().map(|m| m.2.offset).collect();
        let times: Vec<i64> = marked.iter().map(|m| m.2.time_ms).collect();
        let hashes: Vec<i64> = marked.iter().map(|m| m.2.hash).collect();
        // Only where this commit set the offset (offsets never move backwards).
        tx.execute(
            "UPDATE fleetflow_offsets o SET landmark_offset = t.lo, landmark_time_ms = t.lt, landmark_hash = t.lh
             FROM unnest($2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[]) AS t(p, n, lo, lt, lh)
             WHERE o.topic = $1 AND o.partition = t.p AND o.next_offset = t.n",
            &[&settings.topic, &partitions, &nexts, &offsets, &times, &hashes],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Records that everything before `next_offset` is durable. Offsets never move backwards.
pub async fn store_offsets(client: &impl GenericClient, topic: &str, offsets: &[(i32, i64)]) -> Result<(), SinkError> {
    insert_offsets(
        client,
        topic,
        offsets,
        "DO UPDATE SET next_offset = GREATEST(fleetflow_offsets.next_offset, EXCLUDED.next_offset), committed_at = now()",
    )
    .await
}

/// Inserts a starting offset only where none is committed yet (pins `--start latest`).
pub async fn pin_start_offsets(client: &Client, topic: &str, offsets: &[(i32, i64)]) -> Result<(), SinkError> {
    insert_offsets(client, topic, offsets, "DO NOTHING").await
}

async fn insert_offsets(
    client: &impl GenericClient,
    topic: &str,
    offsets: &[(i32, i64)],
    on_conflict: &str,
) -> Result<(), SinkError> {
    let partitions: Vec<i32> = offsets.iter().map(|o| o.0).collect();
    let nexts: Vec<i64> = offsets.iter().map(|o| o.1).collect();
    let sql = format!(
        "INSERT INTO fleetflow_offsets (topic, partition, next_offset)
         SELECT $1, p, n FROM unnest($2::int[], $3::bigint[]) AS t(p, n)
         ON CONFLICT (topic, partition) {on_conflict}"
    );
    client.execute(&sql, &[&topic, &partitions, &nexts]).await?;
    Ok(())
}

/// Where and as whom the committer writes.
#[derive(Clone, Debug)]
pub struct CommitterSettings {
    pub database_url: String,
    pub topic: String,
    /// The job's fencing generation: a commit of a job that lost the topic is refused.
    pub generation: i64,
    /// A commit that takes longer has hung: retried on a new connection.
    pub timeout: Duration,
    /// Where each commit finds its landmarks.
    pub landmarks: Arc<Landmarks>,
}

/// A background task that stores offsets in order, retrying through database outages.
/// `done` counts the commits that reached the database.
pub struct Committer {
    tx: mpsc::UnboundedSender<Vec<(i32, i64, Option<Landmark>)>>,
    landmarks: Arc<Landmarks>,
    sent: u64,
    done: Arc<AtomicU64>,
}

impl Committer {
    pub fn spawn(runtime: &tokio::runtime::Handle, settings: CommitterSettings, stats: Arc<Stats>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<(i32, i64, Option<Landmark>)>>();
        let landmarks = settings.landmarks.clone();
        let done = Arc::new(AtomicU64::new(0));
        let counter = done.clone();
        runtime.spawn(async move {
            let tag = super::fence::session_tag(&settings.topic);
            let mut client: Option<Client> = None;
            while let Some(offsets) = rx.recv().await {
                let mut attempt = 0;
                loop {
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        client = connect_as(&settings.database_url, &tag).await.ok();
                    }
                    if let Some(c) = &mut client {
                        let commit = store_offsets_fenced(c, &settings, &offsets);
                        let result = match tokio::time::timeout(settings.timeout, commit).await {
                            Ok(result) => result,
                            Err(_) => Err(SinkError::Timeout(settings.timeout)),
                        };
                        match result {
                            Ok(()) => break,
                            Err(SinkError::Fenced(line)) => crate::exit::exit_with(crate::exit::Exit::Fenced, &line),
                            Err(e) => {
                                Stats::add(&stats.database_errors, 1);
                                tracing::warn!(error = %e, attempt, "committing offsets failed; retrying")
                            }
                        }
                        client = None;
                    } else {
                        tracing::warn!(attempt, "database unreachable; offsets wait to be committed");
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Stats::add(&stats.offset_commits, 1);
                counter.fetch_add(1, Ordering::Release);
            }
        });
        Committer { tx, landmarks, sent: 0, done }
    }
    /// Queues a commit; returns its sequence number.
    pub fn commit(&mut self, offsets: Vec<(i32, i64)>) -> u64 {
        self.sent += 1;
        let marks = self.landmarks.for_commit(&offsets);
        let commit = offsets.into_iter().zip(marks).map(|((p, o), m)| (p, o, m)).collect();
        // The task outlives every sender; a send can only fail during process teardown.
        let _ = self.tx.send(commit);
        self.sent
    }

    /// The highest sequence number known to be in the database.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// True when every queued commit reached the database.
    pub fn idle(&self) -> bool {
        self.done() == self.sent
    }
}
