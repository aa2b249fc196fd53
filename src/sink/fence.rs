//! Fencing: at most one copy of the job writes a topic into a database.
//!
//! Two mechanisms, each for what it does well:
//! - **Liveness**: process 0 of a job holds a session-level advisory lock for the topic, on a
//!   connection of its own, for the job's whole life. A second copy (a back-fill started next
//!   to the service, a second compose project) cannot get it and refuses to start, naming the
//!   holder. A job that dies loses its session, so a restart takes the lock at once.
//! - **Safety**: taking over bumps the topic's generation in `fleetflow_jobs`, and every write
//!   transaction and offset commit first checks, `FOR SHARE`, that the generation is still
//!   its own. A zombie (a process cut off from its peers that still reaches the database, or
//!   a frozen one resumed) fails its next transaction instead of writing. A zombie transaction
//!   already past the check holds the row lock, so the bump waits for it to end; the new job
//!   reads the watermarks only after the bump, so it sees whatever the zombie committed.
//!
//! Every session of the job carries [`session_tag`] as its application name, so
//! `--take-over` can end the sessions of a job that is frozen rather than gone.

use std::time::Duration;

use tokio_postgres::{Client, Transaction};

use super::{backoff, connect_as, SinkError};

/// First key of the job's advisory lock (the second is the topic's hash). Distinct from the
/// migration lock, which uses the one-key form.
pub const LOCK_CLASS: i32 = 0x666c;

/// How long a starting job retries the lock before refusing: a predecessor that was just
/// killed may need a moment for its session to end.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// How often the lock session is checked.
const KEEPER_INTERVAL: Duration = Duration::from_secs(2);

/// The application name of every database session of a job on `topic` (at most 63 bytes,
/// PostgreSQL's limit, whatever the topic's length).
pub fn session_tag(topic: &str) -> String {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(topic.as_bytes());
    format!("fleetflow job {:016x}", h.finish())
}

/// Who this process is, for the refusal message of a second copy.
pub fn describe_holder(group: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown host".into());
    format!("host {host}, pid {}, consumer group {group:?}", std::process::id())
}

/// Takes the topic for this job and returns its generation. The lock session is kept by a
/// background task; when it is lost and cannot be taken back with the same generation (a
/// second copy got in meanwhile), the process stops with one line.
///
/// With `take_over`, a job that still holds the topic (frozen, or cut off from its peers) is
/// fenced out first: its sessions are ended and the generation bumped before the lock is
/// taken.
pub async fn acquire(url: &str, topic: &str, holder: &str, take_over: bool) -> Result<i64, SinkError> {
    let tag = session_tag(topic);
    let client = connect_as(url, &tag).await?;
    if take_over {
        let ended = end_other_sessions(&client, &tag).await?;
        let generation = bump(&client, topic, holder).await?;
        tracing::warn!(
            topic,
            generation,
            ended_sessions = ended,
            "--take-over: fenced out the job that held the topic"
        );
    }
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    while !try_lock(&client, topic).await? {
        if take_over {
            // The old job's lock session may reconnect before it notices the new generation.
            end_other_sessions(&client, &tag).await?;
        } else if tokio::time::Instant::now() >= deadline {
            return Err(SinkError::Fenced(refusal(&client, topic).await));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let generation =
        if take_over { current(&client, topic).await?.unwrap_or(0) } else { bump(&client, topic, holder).await? };
    tracing::info!(topic, generation, "this job holds the topic");
    tokio::spawn(keep(client, url.to_owned(), topic.to_owned(), generation));
    Ok(generation)
}

/// Checks, inside a write transaction, that this job still holds the topic. Takes the
/// generation row `FOR SHARE`: a job taking over waits for this transaction to end.
pub async fn check(tx: &Transaction<'_>, topic: &str, generation: i64) -> Result<(), SinkError> {
    let row = tx.query_opt("SELECT generation FROM fleetflow_jobs WHERE topic = $1 FOR SHARE", &[&topic]).await?;
    match row.map(|r| r.get::<_, i64>(0)) {
        Some(g) if g == generation => Ok(()),
        found => Err(fenced_out(topic, generation, found)),
    }
}

fn fenced_out(topic: &str, generation: i64, found: Option<i64>) -> SinkError {
    let now = found.map(|g| format!("generation {g}")).unwrap_or_else(|| "no generation".into());
    SinkError::Fenced(format!(
        "another fleetflow job took over topic {topic:?} in this database ({now}; this job had generation \
         {generation}); this copy stops without writing anything more"
    ))
}

async fn try_lock(client: &Client, topic: &str) -> Result<bool, SinkError> {
    Ok(client.query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &[&LOCK_CLASS, &topic]).await?.get(0))
}

async fn bump(client: &Client, topic: &str, holder: &str) -> Result<i64, SinkError> {
    let row = client
        .query_one(
            "INSERT INTO fleetflow_jobs (topic, generation, holder) VALUES ($1, 1, $2)
             ON CONFLICT (topic) DO UPDATE
               SET generation = fleetflow_jobs.generation + 1, holder = EXCLUDED.holder, started_at = now()
             RETURNING generation",
            &[&topic, &holder],
        )
        .await?;
    Ok(row.get(0))
}

async fn current(client: &Client, topic: &str) -> Result<Option<i64>, SinkError> {
    Ok(client.query_opt("SELECT generation FROM fleetflow_jobs WHERE topic = $1", &[&topic]).await?.map(|r| r.get(0)))
}

/// Ends every other session with the job's tag: the old job's lock, writers and committer.
async fn end_other_sessions(client: &Client, tag: &str) -> Result<i64, SinkError> {
    let row = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid() AND datname = current_database()",
            &[&tag],
        )
        .await?;
    Ok(row.get(0))
}

/// The line a second copy prints: who holds the topic, since when, and what to do.
async fn refusal(client: &Client, topic: &str) -> String {
    let holder = client
        .query_opt(
            "SELECT holder, to_char(started_at, 'YYYY-MM-DD HH24:MI:SS TZ') FROM fleetflow_jobs WHERE topic = $1",
            &[&topic],
        )
        .await
        .ok()
        .flatten()
        .map(|r| format!("{}, started {}", r.get::<_, String>(0), r.get::<_, String>(1)))
        .unwrap_or_else(|| "a job that is still starting".into());
    format!(
        "topic {topic:?} is already being written into this database by another fleetflow job ({holder}); \
         two copies would write every record twice, so this one stops. Stop the other job first, or, if it is \
         frozen or cut off, start this one with --take-over"
    )
}

/// Keeps the lock session alive; after losing it (the database restarted, the network
/// broke) takes the lock back, or stops the process if another job got it meanwhile.
async fn keep(client: Client, url: String, topic: String, generation: i64) {
    let tag = session_tag(&topic);
    let mut client = Some(client);
    loop {
        tokio::time::sleep(KEEPER_INTERVAL).await;
        if let Some(c) = &client {
            let alive = tokio::time::timeout(Duration::from_secs(10), c.simple_query("SELECT 1")).await;
            if matches!(alive, Ok(Ok(_))) {
                continue;
            }
        }
        tracing::warn!(topic, "lost the database session that holds the topic; taking it back");
        // Close the old session first: if it is only slow, it still holds the lock, and the
        // server releases it once it sees the connection closed.
        drop(client.take());
        let mut attempt = 0;
        let again = loop {
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
            let Ok(c) = connect_as(&url, &tag).await else { continue };
            match (try_lock(&c, &topic).await, current(&c, &topic).await) {
                (Ok(true), Ok(Some(g))) if g == generation => break c,
                // Still ours, but the server has not yet noticed that our old session is gone.
                (Ok(false), Ok(Some(g))) if g == generation => continue,
                (Ok(_), Ok(found)) => crate::exit::exit_with(
                    crate::exit::Exit::Fenced,
                    &fenced_out(&topic, generation, found).to_string(),
                ),
                _ => continue,
            }
        };
        client = Some(again);
        tracing::info!(topic, generation, "holding the topic again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_tag_is_per_topic_and_fits_an_application_name() {
        let long = "t".repeat(249); // Kafka's longest topic name
        for topic in ["metrics", "other", long.as_str()] {
            let tag = session_tag(topic);
            assert!(tag.len() <= 63, "{tag}");
            assert_eq!(tag, session_tag(topic), "the same in every process");
        }
        assert_ne!(session_tag("metrics"), session_tag("metrics2"));
    }
}
