//! Alert rules evaluated in the job, on what each write transaction committed.
//!
//! - [`rules`]: the `[[alert]]` tables of the config file, checked.
//! - the evaluation itself is a differential dataflow: `fleetflow_dataflows::alerts`.
//! - [`window`]: what the writers hand it after each commit, and what it reloads at start.
//! - [`sink`]: the `alerts` table, kept equal to the rules' episodes, exactly once.
//! - [`alertmanager`]: Prometheus Alertmanager's v2 API.
//!
//! [`WorkerAlerts`] ties them to a worker of the job.

pub mod alertmanager;
pub mod rules;
pub mod sink;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use fleetflow_dataflows::alerts::{AlertFeeder, ClosedFeeder, Condition, Rules};
use timely::worker::Worker;

use self::alertmanager::Alertmanager;
use self::rules::AlertRules;
use self::sink::{spawn_sink, SinkMessage, SinkSettings};
use self::window::{AlertTap, CommittedMinutes};
use crate::config::JobConfig;
use crate::record::now_ms;

/// `fleetflow run`'s alerting, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertConfig {
    pub rules: AlertRules,
    /// How late (after a server's newer minutes) a report may still change an alert.
    pub lateness: Duration,
    pub alertmanager_url: Option<String>,
    pub resend_interval: Duration,
}

/// One line for each rule, as Alertmanager's `summary` annotation.
pub fn summary(rules: &AlertRules, index: usize) -> String {
    let rule = &rules.rules[index];
    match &rule.condition {
        Condition::Silent { after_ms } => {
            format!("no report for {}", humantime::format_duration(Duration::from_millis(*after_ms)))
        }
        Condition::Threshold { metric, aggregate, fleet, compare, for_minutes } => {
            let (word, x) = match compare {
                fleetflow_dataflows::alerts::Comparison::Above(x) => ("above", x),
                fleetflow_dataflows::alerts::Comparison::Below(x) => ("below", x),
            };
            let of = format!("{} {:?}", rules.metrics[*metric], aggregate).to_lowercase();
            let scope = match fleet {
                Some(f) => format!("fleet {f:?} of ").to_lowercase(),
                None => String::new(),
            };
            format!("{scope}{of} {word} {x} for {for_minutes}m")
        }
    }
}

/// What must be equal in every process: the rules as evaluated.
fn fingerprint(alerts: &AlertConfig) -> u64 {
    use std::hash::Hasher;
    let mut hash = fnv::FnvHasher::default();
    hash.write(format!("{:?} {:?}", alerts.rules, alerts.lateness).as_bytes());
    hash.finish()
}

/// A worker's share of the alert evaluation.
pub struct WorkerAlerts {
    feeder: AlertFeeder,
    committed: std::sync::mpsc::Receiver<CommittedMinutes>,
    /// Worker 0: the task that writes the alerts table and tells Alertmanager.
    sink: Option<tokio::sync::mpsc::UnboundedSender<SinkMessage>>,
    rebuilt: bool,
    /// Whether the worker said it holds as many servers as it may.
    said_full: bool,
}

impl WorkerAlerts {
    /// Builds the alert dataflow on this worker (before the ingest dataflow, on every
    /// worker), and on worker 0 reloads the durable window and starts the sink. Returns the
    /// tap the writers send committed minutes to.
    ///
    /// No writer of the job may commit before worker 0 has read the window (it would be
    /// counted twice), so every worker waits here for worker 0's word.
    ///
    /// Every process must run the same rules (they build the same dataflows): a process
    /// whose rules differ from process 0's stops here with one line.
    pub fn start(
        worker: &mut Worker,
        config: &JobConfig,
        generation: i64,
        runtime: &tokio::runtime::Handle,
    ) -> anyhow::Result<Option<(WorkerAlerts, AlertTap)>> {
        let alerts = &config.alerts;
        let mine = fingerprint(alerts);
        match fleetflow_dataflows::from_first_worker::from_first_worker(worker, Some(mine)) {
            Some(first) if first == mine => {}
            Some(_) => anyhow::bail!(
                "this process's alert rules (its --config [[alert]] tables and --alert-lateness) differ from process \
                 0's; start every process of the job with the same ones"
            ),
            None => anyhow::bail!("worker 0 did not say which alert rules it runs"),
        }
        if alerts.rules.is_empty() {
            return Ok(None);
        }
        let rules: Arc<Rules> = Arc::new(alerts.rules.evaluated(alerts.lateness));
        let mut feeder = AlertFeeder::build(worker, rules.clone(), now_ms().max(0) as u64);
        let loaded = (worker.index() == 0).then(|| {
            let started = std::time::Instant::now();
            let result = runtime.block_on(async {
                let client = crate::sink::connect(&config.database.url).await?;
                window::load_window(&client, &rules).await
            });
            match result {
                Ok(minutes) => {
                    let (servers, rows) =
                        (minutes.iter().map(|m| &m.0).collect::<std::collections::HashSet<_>>().len(), minutes.len());
                    for (server, minute, row) in &minutes {
                        feeder.apply(server, *minute, row);
                    }
                    tracing::info!(
                        rules = rules.rules.len(),
                        servers,
                        minutes = rows,
                        ms = started.elapsed().as_millis() as u64,
                        "alert rules: the durable window is loaded"
                    );
                    String::new()
                }
                Err(e) => format!("alert rules: cannot load the recent minutes from the database: {e}"),
            }
        });
        match fleetflow_dataflows::from_first_worker::from_first_worker(worker, loaded) {
            Some(error) if error.is_empty() => {}
            Some(error) => anyhow::bail!(error),
            None => anyhow::bail!("worker 0 did not say whether it loaded the alert window"),
        }
        let sink = (worker.index() == 0).then(|| {
            let alertmanager = alerts.alertmanager_url.as_deref().map(|url| {
                Arc::new(Alertmanager::new(url, alerts.resend_interval).expect("checked in JobConfig::from_args"))
            });
            spawn_sink(
                runtime,
                SinkSettings {
                    database_url: config.database.url.clone(),
                    topic: config.kafka.topic.clone(),
                    generation,
                    names: alerts.rules.rules.iter().map(|r| r.name.clone()).collect(),
                    labels: alerts.rules.labels.clone(),
                    summaries: (0..alerts.rules.rules.len()).map(|i| summary(&alerts.rules, i)).collect(),
                    alertmanager,
                    resend_interval: alerts.resend_interval,
                    timeout: config.sink.timeout,
                },
            )
        });
        let (sender, committed) = std::sync::mpsc::channel();
        let tap = AlertTap { metrics: Arc::new(rules.metrics.clone()), sender };
        Ok(Some((WorkerAlerts { feeder, committed, sink, rebuilt: false, said_full: false }, tap)))
    }

    /// Feeds what the writers committed since the last turn, moves time and this worker's
    /// clock (to `reading`: the latest moment everything this worker had read by then is
    /// durable, `Ingest::durable_reading`, taken before this call), and hands worker 0's
    /// finished changes to the sink. Call every turn of the worker loop.
    pub fn turn(&mut self, reading: Option<u64>) {
        // Read after the reading and before taking the commits: a clock reading of another
        // worker is fed once this worker's time has passed it, and that must mean this
        // worker took every commit made before the reading (AlertFeeder::tick).
        let now = now_ms().max(0) as u64;
        while let Ok(minutes) = self.committed.try_recv() {
            for (server, minute, row) in &minutes {
                self.feeder.apply(server, *minute, row);
            }
        }
        if self.feeder.ignored_servers > 0 && !self.said_full {
            self.said_full = true;
            tracing::warn!(
                max_servers = self.feeder.rules().max_servers,
                "alert rules: this worker holds as many servers as it may; the rules do not evaluate newer \
                 server ids until older ones are forgotten (an hour without a report). Their rows are still written"
            );
        }
        self.feeder.tick(now, reading);
        self.deliver();
    }

    fn deliver(&mut self) {
        let Some(sink) = &self.sink else { return };
        for (_, changes) in self.feeder.changes() {
            let _ = sink.send(SinkMessage::Changes(changes));
        }
        if !self.rebuilt && self.feeder.rebuilt() {
            self.rebuilt = true;
            let _ = sink.send(SinkMessage::Rebuilt);
        }
    }

    /// After the ingest dataflow finished (everything durable): feeds the last commits,
    /// closes the inputs, waits until every worker closed theirs, and on worker 0 waits
    /// (at most `limit`) until the sink wrote and sent everything.
    pub fn finish(mut self, worker: &mut Worker, limit: Duration) {
        // The clock stays where the last turn left it: a shutdown in a backlog must not
        // make the servers not read yet look silent.
        self.turn(None);
        let deadline = std::time::Instant::now() + limit;
        let WorkerAlerts { feeder, committed: _, sink, .. } = self;
        let mut closed: ClosedFeeder = feeder.close();
        while !closed.done() && std::time::Instant::now() < deadline {
            worker.step_or_park(Some(Duration::from_millis(5)));
        }
        let Some(sink) = sink else { return };
        for (_, changes) in closed.changes() {
            let _ = sink.send(SinkMessage::Changes(changes));
        }
        let (done, flushed) = std::sync::mpsc::channel();
        if sink.send(SinkMessage::Flush(done)).is_ok() {
            let left = deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_secs(1));
            if flushed.recv_timeout(left).is_err() {
                tracing::warn!("the alerts table was not brought up to date before the end; the next start does it");
            }
        }
    }
}
