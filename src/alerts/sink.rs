//! The `alerts` table, kept equal to the episodes the rules produce, and Alertmanager told.
//!
//! Worker 0 hands this task every change of the episode collection. The task keeps the
//! current episodes per (rule, server) and reconciles the table with them, key by key:
//! - an episode that overlaps a stored alert of its key is that alert (its end, state and
//!   value are brought up to date; if late data merged two alerts, the later rows go);
//! - an episode that overlaps none is a new alert;
//! - a firing alert that no episode covers any more is resolved now (the server reported
//!   again, late data lowered its minutes, or the rule is gone).
//!
//! Reconciling is idempotent: after a crash the job rebuilds the same episodes from what is
//! durable, and the table already holds them, so nothing is repeated or lost; the first
//! pass after a start also resolves what ended while the job was down. A partial unique
//! index keeps at most one firing row per (rule, server).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetflow_dataflows::alerts::{AlertKey, Episode, FLEET};
use tokio::sync::mpsc;
use tokio_postgres::{Client, Transaction};

use super::alertmanager::{Alertmanager, AmAlert};
use crate::sink::writer::within;
use crate::sink::SinkError;

/// Migration 6: the alerts table.
pub const MIGRATION: &str = r#"
    CREATE TABLE alerts (
        id        bigserial   PRIMARY KEY,
        rule      text        NOT NULL,
        server_id text,                       -- NULL for fleet rules
        labels    jsonb       NOT NULL,       -- as sent to Alertmanager
        state     text        NOT NULL CHECK (state IN ('firing', 'resolved')),
        started   timestamptz NOT NULL,       -- first breaching minute; for silence, when it began
        resolved  timestamptz,                -- end of the last breaching minute, or when it was seen to end
        value     double precision,           -- the rule's number in the last breaching minute
        updated   timestamptz NOT NULL DEFAULT now(),
        CHECK ((state = 'firing') = (resolved IS NULL))
    );
    CREATE UNIQUE INDEX alerts_one_firing ON alerts (rule, coalesce(server_id, '')) WHERE state = 'firing';
    CREATE INDEX alerts_by_key ON alerts (rule, server_id, started);
"#;

/// What the worker hands the sink.
#[derive(Debug)]
pub enum SinkMessage {
    /// Changes of the episode collection at one completed timestamp.
    Changes(Vec<(AlertKey, Episode, isize)>),
    /// Everything durable at start has been evaluated: firing rows without an episode end.
    Rebuilt,
    /// Answer once everything received so far is in the table and sent.
    Flush(std::sync::mpsc::Sender<()>),
}

/// What the sink needs to know about the rules.
#[derive(Clone, Debug)]
pub struct SinkSettings {
    pub database_url: String,
    /// The job's topic and fencing generation: every write checks the job still holds it.
    pub topic: String,
    pub generation: i64,
    /// Per rule index: its name, its labels (the user's) and a one-line summary.
    pub names: Vec<String>,
    pub labels: Vec<BTreeMap<String, String>>,
    pub summaries: Vec<String>,
    pub alertmanager: Option<Arc<Alertmanager>>,
    pub resend_interval: Duration,
    pub timeout: Duration,
}

/// An alert's start, end (if it ended) and value.
type Span = (DateTime<Utc>, Option<DateTime<Utc>>, Option<f64>);

/// A stored alert of one key.
#[derive(Debug)]
struct Stored {
    id: i64,
    started: DateTime<Utc>,
    resolved: Option<DateTime<Utc>>,
}

pub fn spawn_sink(runtime: &tokio::runtime::Handle, settings: SinkSettings) -> mpsc::UnboundedSender<SinkMessage> {
    let (tx, rx) = mpsc::unbounded_channel();
    runtime.spawn(run(settings, rx));
    tx
}

async fn run(settings: SinkSettings, mut rx: mpsc::UnboundedReceiver<SinkMessage>) {
    let mut current: HashMap<AlertKey, BTreeSet<Episode>> = HashMap::new();
    let mut dirty: BTreeSet<AlertKey> = BTreeSet::new();
    let mut sweep = false;
    let mut waiting: Vec<std::sync::mpsc::Sender<()>> = Vec::new();
    let mut client: Option<Client> = None;
    let mut attempt = 0u32;
    // After a failed write: when to try again, whether or not anything else arrives.
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut resend = tokio::time::interval(settings.resend_interval);
    resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    while open || !dirty.is_empty() || sweep {
        let message = tokio::select! {
            m = rx.recv(), if open && retry_at.is_none() => Some(m),
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                retry_at = None;
                None
            }
            _ = resend.tick() => {
                if let Some(am) = &settings.alertmanager {
                    match resend_recent(&mut client, &settings).await {
                        Ok(alerts) => am.send(&alerts).await,
                        Err(e) => {
                            client = None;
                            tracing::warn!(error = %e, "could not read the alerts to resend");
                        }
                    }
                }
                continue;
            }
        };
        if let Some(mut next) = message {
            loop {
                match next {
                    None => open = false,
                    Some(SinkMessage::Changes(changes)) => {
                        for (key, episode, diff) in changes {
                            let episodes = current.entry(key.clone()).or_default();
                            if diff > 0 {
                                episodes.insert(episode);
                            } else {
                                episodes.remove(&episode);
                            }
                            if episodes.is_empty() {
                                current.remove(&key);
                            }
                            dirty.insert(key);
                        }
                    }
                    Some(SinkMessage::Rebuilt) => sweep = true,
                    Some(SinkMessage::Flush(done)) => waiting.push(done),
                }
                match rx.try_recv() {
                    Ok(m) => next = Some(m),
                    Err(_) => break,
                }
            }
        }
        if dirty.is_empty() && !sweep {
            waiting.drain(..).for_each(|w| {
                let _ = w.send(());
            });
            continue;
        }
        match reconcile_pending(&mut client, &settings, &current, &mut dirty, &mut sweep).await {
            Ok(sent) => {
                attempt = 0;
                if let Some(am) = &settings.alertmanager {
                    am.send(&sent).await;
                }
                waiting.drain(..).for_each(|w| {
                    let _ = w.send(());
                });
            }
            Err(SinkError::Fenced(line)) => crate::exit::exit_with(crate::exit::Exit::Fenced, &line),
            Err(e) => {
                client = None;
                tracing::warn!(error = %e, attempt, "could not write the alerts table; retrying");
                retry_at = Some(tokio::time::Instant::now() + crate::sink::backoff(attempt));
                attempt += 1;
            }
        }
    }
}

/// Connects when there is no usable connection.
async fn connected<'a>(client: &'a mut Option<Client>, settings: &SinkSettings) -> Result<&'a mut Client, SinkError> {
    if client.as_ref().is_none_or(Client::is_closed) {
        *client = Some(within(settings.timeout, crate::sink::connect(&settings.database_url)).await?);
    }
    Ok(client.as_mut().expect("connected above"))
}

/// What Alertmanager is told again every resend interval.
async fn resend_recent(client: &mut Option<Client>, settings: &SinkSettings) -> Result<Vec<AmAlert>, SinkError> {
    let client = connected(client, settings).await?;
    within(settings.timeout, recent_alerts(client, settings)).await
}

/// Writes every dirty key (and, after a start, every firing row) in one transaction.
async fn reconcile_pending(
    client: &mut Option<Client>,
    settings: &SinkSettings,
    current: &HashMap<AlertKey, BTreeSet<Episode>>,
    dirty: &mut BTreeSet<AlertKey>,
    sweep: &mut bool,
) -> Result<Vec<AmAlert>, SinkError> {
    let t = settings.timeout;
    let client = connected(client, settings).await?;
    let tx = within(t, client.transaction()).await?;
    // A job that lost the topic to another copy must not rewrite its alerts.
    within(t, crate::sink::fence::check(&tx, &settings.topic, settings.generation)).await?;
    let now = Utc::now();
    let mut keys = dirty.clone();
    if *sweep {
        // Firing rows whose rule is gone end now; the others are checked like any key.
        let rows = within(t, tx.query("SELECT id, rule, server_id FROM alerts WHERE state = 'firing'", &[])).await?;
        for row in rows {
            let (id, rule, server): (i64, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
            match settings.names.iter().position(|n| *n == rule) {
                Some(index) => {
                    keys.insert((index as u16, server.unwrap_or_default()));
                }
                None => {
                    tracing::info!(rule, ?server, "resolving an alert of a rule that is no longer configured");
                    within(t, resolve(&tx, id, now)).await?;
                }
            }
        }
    }
    let mut sent = Vec::new();
    let empty = BTreeSet::new();
    for key in &keys {
        let episodes = current.get(key).unwrap_or(&empty);
        if let Some(alert) = within(t, reconcile(&tx, settings, key, episodes, now)).await? {
            sent.push(alert);
        }
    }
    within(t, tx.commit()).await?;
    dirty.clear();
    *sweep = false;
    Ok(sent)
}

/// Brings one key's rows in line with its episodes; returns the alert Alertmanager should
/// now hold for the key (its newest row), if any row changed.
async fn reconcile(
    tx: &Transaction<'_>,
    settings: &SinkSettings,
    key: &AlertKey,
    episodes: &BTreeSet<Episode>,
    now: DateTime<Utc>,
) -> Result<Option<AmAlert>, SinkError> {
    let (rule, server) = (&settings.names[key.0 as usize], (key.1 != FLEET).then_some(key.1.as_str()));
    let ts = |us: i64| DateTime::from_timestamp_micros(us).unwrap_or_default();
    let since = episodes.iter().map(|e| ts(e.started_us)).min().unwrap_or(now);
    let rows = tx
        .query(
            "SELECT id, started, resolved FROM alerts WHERE rule = $1 AND server_id IS NOT DISTINCT FROM $2
               AND (resolved IS NULL OR resolved > $3) ORDER BY started",
            &[rule, &server, &since],
        )
        .await?;
    let mut stored: Vec<Stored> =
        rows.iter().map(|r| Stored { id: r.get(0), started: r.get(1), resolved: r.get(2) }).collect();
    let labels = serde_json::Value::Object(labels_map(settings, key).into_iter().map(|(k, v)| (k, v.into())).collect());
    let mut changed = false;
    let mut newest: Option<Span> = None;
    let mut used: BTreeSet<i64> = BTreeSet::new();
    for episode in episodes {
        let (start, end) = (ts(episode.started_us), episode.ended_us.map(ts));
        let value = episode.value.map(|v| v.0);
        let overlapping: Vec<&Stored> = stored
            .iter()
            .filter(|s| !used.contains(&s.id))
            .filter(|s| end.is_none_or(|end| s.started < end) && s.resolved.is_none_or(|r| r > start))
            .collect();
        let state = if end.is_none() { "firing" } else { "resolved" };
        let started = match overlapping.first() {
            None => {
                tx.execute(
                    "INSERT INTO alerts (rule, server_id, labels, state, started, resolved, value)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[rule, &server, &labels, &state, &start, &end, &value],
                )
                .await?;
                changed = true;
                log_change(rule, server, state, value);
                start
            }
            Some(first) => {
                // Late data joined two alerts into one: the later rows were the same alert.
                // They go first: one of them may be the key's firing row, and the unique
                // index allows one firing row per key when `first` becomes the firing one.
                for merged in &overlapping[1..] {
                    tx.execute("DELETE FROM alerts WHERE id = $1", &[&merged.id]).await?;
                    used.insert(merged.id);
                    changed = true;
                }
                let started = first.started.min(start);
                if first.resolved != end || first.started != started {
                    changed = true;
                    log_change(rule, server, state, value);
                }
                tx.execute(
                    "UPDATE alerts SET started = $2, resolved = $3, state = $4, value = $5, labels = $6, updated = now()
                     WHERE id = $1 AND (started, resolved, state, value, labels)
                       IS DISTINCT FROM ($2, $3, $4, $5, $6)",
                    &[&first.id, &started, &end, &state, &value, &labels],
                )
                .await?;
                used.insert(first.id);
                started
            }
        };
        if newest.is_none_or(|(s, _, _)| started >= s) {
            newest = Some((started, end, value));
        }
    }
    for s in stored.iter_mut().filter(|s| s.resolved.is_none() && !used.contains(&s.id)) {
        // Nothing covers this firing alert any more: it ends now.
        resolve(tx, s.id, now).await?;
        log_change(rule, server, "resolved", None);
        changed = true;
        if newest.is_none_or(|(start, _, _)| s.started >= start) {
            newest = Some((s.started, Some(now), None));
        }
    }
    Ok(changed.then_some(newest).flatten().map(|(starts_at, ends_at, value)| AmAlert {
        labels: labels_map(settings, key),
        summary: settings.summaries[key.0 as usize].clone(),
        value,
        starts_at,
        ends_at,
    }))
}

async fn resolve(tx: &Transaction<'_>, id: i64, now: DateTime<Utc>) -> Result<(), SinkError> {
    tx.execute(
        "UPDATE alerts SET state = 'resolved', resolved = greatest($2, started), updated = now() WHERE id = $1",
        &[&id, &now],
    )
    .await?;
    Ok(())
}

fn log_change(rule: &str, server: Option<&str>, state: &str, value: Option<f64>) {
    tracing::info!(rule, server = server.unwrap_or("(fleet)"), state, ?value, "alert");
}

/// The labels of a key's alerts: the rule's own, then ours.
fn labels_map(settings: &SinkSettings, key: &AlertKey) -> BTreeMap<String, String> {
    let mut labels = settings.labels[key.0 as usize].clone();
    labels.insert("alertname".into(), settings.names[key.0 as usize].clone());
    if key.1 == FLEET {
        labels.insert("scope".into(), "fleet".into());
    } else {
        labels.insert("scope".into(), "server".into());
        labels.insert("server".into(), key.1.clone());
    }
    labels
}

/// The newest alert of every (rule, server) that is firing or ended in the last 15 minutes
/// (Alertmanager is told about resolutions for a while, as Prometheus does).
async fn recent_alerts(client: &Client, settings: &SinkSettings) -> Result<Vec<AmAlert>, SinkError> {
    let rows = client
        .query(
            "SELECT DISTINCT ON (rule, coalesce(server_id, '')) rule, server_id, started, resolved, value
             FROM alerts WHERE state = 'firing' OR resolved > now() - interval '15 minutes'
             ORDER BY rule, coalesce(server_id, ''), started DESC",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let rule: String = r.get(0);
            let index = settings.names.iter().position(|n| *n == rule)?;
            let key = (index as u16, r.get::<_, Option<String>>(1).unwrap_or_default());
            Some(AmAlert {
                labels: labels_map(settings, &key),
                summary: settings.summaries[index].clone(),
                value: r.get(4),
                starts_at: r.get(2),
                ends_at: r.get(3),
            })
        })
        .collect())
}
