//! Alert rules, maintained incrementally with differential dataflow.
//!
//! What the rules read is what the write transactions committed: per server and minute, the
//! count of reports, the newest report time and count/sum/min/max of every metric a rule
//! names ([`MinuteRow`]). Each worker keeps a window of those rows for the servers whose
//! key groups it writes ([`AlertFeeder`]) and turns every committed change into a
//! retraction of the old row and an insertion of the new one. The rules are reductions and
//! joins over that collection, so an alert starts and ends as data arrives, late data
//! included, and nothing polls.
//!
//! - A **threshold rule** (`cpu` `avg` above 90 for 3 minutes) is a reduction per (rule,
//!   server) over the server's minutes. A server's minute is complete once the server has
//!   reported in a later minute (event time, so a replay of old data gives the same answer
//!   as the live stream did); a run of complete minutes that breach, at least `for` long, is
//!   an episode. It is open while the minute after it is the server's newest, incomplete
//!   one; a later complete minute that does not breach, or one with no report, ends it.
//! - A **fleet rule** first reduces each minute over all servers (avg, min, max or a
//!   quantile of the servers' values), then runs the same episodes over the fleet's minutes.
//! - A **silence rule** needs time to pass without data, so time is an input too: every
//!   worker feeds its own clock record, moved to the latest moment at which it had read its
//!   partitions to the end and everything it had read by then is durable (and fed once every
//!   worker has taken what was committed before, see [`AlertFeeder::tick`]), and the fleet's
//!   clock is the least of them once every worker has fed one. A server whose newest report
//!   is older than `silent_for` by that clock (but seen within `forget_after`) is silent. So
//!   a job working through a backlog (after a restart, or behind the producers) judges
//!   silence only as far as it has written, instead of finding every server silent; and the
//!   clock is data rather than the dataflow's timestamps, so closing the inputs at shutdown
//!   does not make every server look silent.
//!
//! The output, a collection of [`Episode`]s keyed by (rule, server), is gathered on worker 0
//! and handed out per completed timestamp ([`AlertFeeder::changes`]). Because the
//! collection is a function of the committed rows and the clock alone, a restart that
//! reloads the committed rows of the window gets the same episodes: it neither loses,
//! repeats nor invents one. Memory holds the window (the longest `for` plus the lateness
//! allowance, per server) and nothing else.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::input::{Input, InputSession};
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::{Exchange, Inspect, Probe};
use timely::dataflow::ProbeHandle;
use timely::worker::Worker;

/// A minute, in microseconds.
pub const MINUTE_US: i64 = 60_000_000;

/// The resolution of the dataflow's time (ms): what is fed within one tick is evaluated
/// together.
pub const TICK_MS: u64 = 1_000;

/// The key of [`FLEET`] rules' episodes in place of a server id (server ids are never empty).
pub const FLEET: &str = "";

/// An `f64` with a total order: differential sorts and consolidates its data.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Num(pub f64);

impl PartialEq for Num {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0).is_eq()
    }
}
impl Eq for Num {}
impl PartialOrd for Num {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl std::hash::Hash for Num {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Equal under total_cmp exactly when the bits are equal.
        self.0.to_bits().hash(state);
    }
}
impl Ord for Num {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// count, sum, min and max of one metric over a server's minute (count 0: no value).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Agg {
    /// Values seen.
    pub count: i64,
    /// Their sum, least and greatest (meaningless while `count` is 0).
    pub sum: Num,
    #[allow(missing_docs)]
    pub min: Num,
    #[allow(missing_docs)]
    pub max: Num,
}

impl Agg {
    /// Counts one more value.
    pub fn add(&mut self, v: f64) {
        self.merge(&Agg { count: 1, sum: Num(v), min: Num(v), max: Num(v) });
    }

    /// Adds another part of the same minute.
    pub fn merge(&mut self, other: &Agg) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        self.count += other.count;
        self.sum.0 += other.sum.0;
        self.min.0 = self.min.0.min(other.min.0);
        self.max.0 = self.max.0.max(other.max.0);
    }

    /// The minute's number for a rule, if it saw any value.
    pub fn value(&self, aggregate: Aggregate) -> Option<f64> {
        (self.count > 0).then(|| match aggregate {
            Aggregate::Avg => self.sum.0 / self.count as f64,
            Aggregate::Min => self.min.0,
            Aggregate::Max => self.max.0,
        })
    }
}

/// One server's minute as the rules see it. `aggs[i]` belongs to `Rules::metrics[i]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MinuteRow {
    /// Reports in the minute.
    pub count: i64,
    /// The newest report time in the minute (µs since the Unix epoch).
    pub last_us: i64,
    /// Per metric the rules read.
    pub aggs: Vec<Agg>,
}

impl MinuteRow {
    /// Adds another part of the same minute.
    pub fn merge(&mut self, other: &MinuteRow) {
        if self.count == 0 {
            self.last_us = other.last_us;
        }
        self.count += other.count;
        self.last_us = self.last_us.max(other.last_us);
        if self.aggs.len() < other.aggs.len() {
            self.aggs.resize(other.aggs.len(), Agg::default());
        }
        for (mine, theirs) in self.aggs.iter_mut().zip(&other.aggs) {
            mine.merge(theirs);
        }
    }
}

/// How a server's minute of one metric becomes one number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Aggregate {
    Avg,
    Min,
    Max,
}

/// How a minute of the fleet (every server's value of that minute) becomes one number.
#[derive(Clone, Copy, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum FleetAggregate {
    Avg,
    Min,
    Max,
    /// The q-quantile (nearest rank, like `percentile_disc`), 0 < q <= 1.
    Quantile(f64),
}

impl FleetAggregate {
    /// `values` sorted ascending, not empty.
    fn of(self, values: &[f64]) -> f64 {
        match self {
            FleetAggregate::Avg => values.iter().sum::<f64>() / values.len() as f64,
            FleetAggregate::Min => values[0],
            FleetAggregate::Max => values[values.len() - 1],
            FleetAggregate::Quantile(q) => {
                let rank = (q * values.len() as f64).ceil() as usize;
                values[rank.clamp(1, values.len()) - 1]
            }
        }
    }
}

/// A threshold: a minute breaches when its number is strictly above or below it.
#[derive(Clone, Copy, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Comparison {
    Above(f64),
    Below(f64),
}

impl Comparison {
    /// Whether `v` breaches.
    pub fn holds(self, v: f64) -> bool {
        match self {
            Comparison::Above(x) => v > x,
            Comparison::Below(x) => v < x,
        }
    }
}

/// What a rule watches.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// `aggregate` of `metric` (an index into `Rules::metrics`) per server and minute, or
    /// across the fleet with `fleet`, compared for `for_minutes` consecutive complete minutes.
    #[allow(missing_docs)]
    Threshold {
        metric: usize,
        aggregate: Aggregate,
        fleet: Option<FleetAggregate>,
        compare: Comparison,
        for_minutes: u32,
    },
    /// No report for this long (by the clock) from a server seen within `Rules::forget_after_ms`.
    #[allow(missing_docs)]
    Silent { after_ms: u64 },
}

/// A named condition; the name identifies its alerts.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub struct Rule {
    pub name: String,
    pub condition: Condition,
}

/// The rules of a job, checked, with what their evaluation needs to keep.
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    /// In the order their indexes name them.
    pub rules: Vec<Rule>,
    /// The metrics the rules name, in the order of [`MinuteRow::aggs`].
    pub metrics: Vec<String>,
    /// Minutes kept per server, counted back from its newest: the longest `for` plus the
    /// lateness allowance. Data for an older minute changes no alert.
    pub window_minutes: u32,
    /// A server not heard from for this long is forgotten (its silence ends too).
    pub forget_after_ms: u64,
    /// Servers one worker keeps at most: past it, a server it does not hold yet is not
    /// evaluated (counted in [`AlertFeeder::ignored_servers`]), so a flood of new server ids
    /// cannot grow memory without bound.
    pub max_servers: usize,
}

impl Rules {
    /// Whether an alert can need the clock (a silence rule): then every worker feeds it.
    pub fn needs_clock(&self) -> bool {
        self.rules.iter().any(|r| matches!(r.condition, Condition::Silent { .. }))
    }
}

/// One alert of a rule: from `started_us` (the first breaching minute; for silence, the
/// moment the server became silent) to `ended_us` (the end of the last breaching minute), or
/// still going. `value`: the rule's number in the last breaching minute.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Episode {
    pub started_us: i64,
    pub ended_us: Option<i64>,
    pub value: Option<Num>,
}

/// (rule index, server id or [`FLEET`]).
pub type AlertKey = (u16, String);

/// Episodes of a threshold over one series: `series` holds (minute start, value) in
/// ascending minute order, a minute without the metric as `None`. The newest minute is still
/// incomplete and only tells that the ones before it are done.
pub fn threshold_episodes(
    compare: Comparison,
    for_minutes: u32,
    series: impl IntoIterator<Item = (i64, Option<f64>)>,
) -> Vec<Episode> {
    let series: Vec<(i64, Option<f64>)> = series.into_iter().collect();
    let Some(&(newest, _)) = series.last() else { return Vec::new() };
    let complete = &series[..series.len() - 1];
    let for_minutes = i64::from(for_minutes.max(1));
    let mut episodes = Vec::new();
    // (first minute, last minute, value of the last minute)
    let mut run: Option<(i64, i64, f64)> = None;
    let mut close = |run: Option<(i64, i64, f64)>, open: bool| {
        if let Some((first, last, value)) = run {
            if (last - first) / MINUTE_US + 1 >= for_minutes {
                let ended_us = (!open).then_some(last + MINUTE_US);
                episodes.push(Episode { started_us: first, ended_us, value: Some(Num(value)) });
            }
        }
    };
    for &(minute, value) in complete {
        let breach = value.filter(|v| compare.holds(*v));
        run = match (run, breach) {
            (Some((first, last, _)), Some(v)) if minute == last + MINUTE_US => Some((first, minute, v)),
            (previous, Some(v)) => {
                close(previous, false);
                Some((minute, minute, v))
            }
            (previous, None) => {
                close(previous, false);
                None
            }
        };
    }
    // A run reaching the newest minute goes on until that minute is complete.
    let open = run.is_some_and(|(_, last, _)| last + MINUTE_US == newest);
    close(run, open);
    episodes
}

type Update = (AlertKey, Episode, u64, isize);

/// The changes of the episode collection at one timestamp, consolidated.
pub type Changes = (u64, Vec<(AlertKey, Episode, isize)>);

/// One worker's part of the alert evaluation: the dataflow, the window of committed minutes
/// it feeds in, and (on worker 0) the episodes that come out.
pub struct AlertFeeder {
    rules: Arc<Rules>,
    minutes: InputSession<u64, (String, (i64, u32, MinuteRow)), isize>,
    /// This worker's index: its parts of a minute are its own.
    worker: u32,
    /// This worker's clock record: (worker, ms), moved only while it is caught up.
    clock: InputSession<u64, (u32, u64), isize>,
    /// With silence rules every worker feeds its clock; every worker advances it anyway.
    feeds_clock: bool,
    clock_value: Option<u64>,
    /// A clock reading not fed yet: (the dataflow time it was taken at, its value in ms).
    /// It waits until every worker's input has passed that time, so that every worker has
    /// applied what its writers committed before the reading (see [`tick`](Self::tick)).
    pending_clock: Option<(u64, u64)>,
    /// On worker 0: the dataflow time at which the fleet's clock first existed.
    clock_started: Rc<std::cell::Cell<Option<u64>>>,
    /// The wall clock of the last tick: rows of servers forgotten by then are not taken.
    now_ms: u64,
    window: HashMap<String, BTreeMap<i64, MinuteRow>>,
    probe: ProbeHandle<u64>,
    output: Rc<RefCell<Vec<Update>>>,
    last_sweep_ms: u64,
    /// Rows for minutes older than the window: they change no alert.
    pub ignored_late: u64,
    /// Rows of new servers refused because the worker held `Rules::max_servers` already.
    pub ignored_servers: u64,
}

impl AlertFeeder {
    /// Builds the alert dataflow on `worker` (every worker must, in the same order as its
    /// other dataflows). Nothing is fed yet: [`load`](Self::load) the durable window first.
    /// `now_ms`: the wall clock at start.
    pub fn build(worker: &mut Worker, rules: Arc<Rules>, now_ms: u64) -> AlertFeeder {
        let output = Rc::new(RefCell::new(Vec::new()));
        let probe = ProbeHandle::new();
        let feeds_clock = rules.needs_clock();
        let peers = worker.peers();
        let clock_started = Rc::new(std::cell::Cell::new(None));
        let (minutes, clock) = worker.dataflow::<u64, _, _>(|scope| {
            let (minutes_input, parts) = scope.new_collection::<(String, (i64, u32, MinuteRow)), isize>();
            let (clock_input, worker_clocks) = scope.new_collection::<(u32, u64), isize>();
            // The fleet's clock: the least of the workers' clocks, once every worker fed one.
            let clock = worker_clocks
                .map(|(worker, ms)| ((), (worker, ms)))
                .reduce(move |_, clocks: &[(&(u32, u64), isize)], out| {
                    let mut workers: Vec<u32> = clocks.iter().map(|((w, _), _)| *w).collect();
                    workers.dedup();
                    if workers.len() == peers {
                        let least = clocks.iter().map(|((_, ms), _)| *ms).min().expect("every worker fed one");
                        out.push((least, 1isize));
                    }
                })
                .map(|((), ms)| ms);
            let started = clock_started.clone();
            clock
                .inner
                .clone()
                .exchange(|_| 0)
                .inspect(move |(_, time, diff)| {
                    if *diff > 0 && started.get().is_none_or(|t| *time < t) {
                        started.set(Some(*time));
                    }
                })
                .probe_with(&probe);
            // Each worker feeds its own part of a minute (records are routed by message key,
            // which need not be the serverId): the parts add up here.
            let minutes = parts
                .map(|(server, (minute, worker, row))| ((server, minute), (worker, row)))
                .reduce(|_, parts: &[(&(u32, MinuteRow), isize)], out| {
                    let mut sum = MinuteRow::default();
                    for ((_, row), n) in parts {
                        if *n > 0 {
                            sum.merge(row);
                        }
                    }
                    out.push((sum, 1));
                })
                .map(|((server, minute), row)| (server, (minute, row)));

            // Per server, the episodes of every per-server threshold rule: one evaluation
            // per changed server (not one per rule), over one arrangement of its minutes.
            let server_rules = rules.clone();
            let window_us = i64::from(rules.window_minutes.max(1)) * MINUTE_US;
            let server_episodes = minutes
                .clone()
                .reduce(move |_, minutes: &[(&(i64, MinuteRow), isize)], out| {
                    // Parts of old minutes may linger on a worker that saw no newer data.
                    let newest = minutes.last().map_or(0, |((m, _), _)| *m);
                    let window: Vec<&(i64, MinuteRow)> =
                        minutes.iter().map(|(m, _)| *m).filter(|(m, _)| *m >= newest - window_us).collect();
                    for (i, rule) in server_rules.rules.iter().enumerate() {
                        let Condition::Threshold { metric, aggregate, fleet: None, compare, for_minutes } =
                            rule.condition
                        else {
                            continue;
                        };
                        let series = window
                            .iter()
                            .map(|(minute, row)| (*minute, row.aggs.get(metric).and_then(|a| a.value(aggregate))));
                        for episode in threshold_episodes(compare, for_minutes, series) {
                            out.push(((i as u16, episode), 1isize));
                        }
                    }
                })
                .map(|(server, (rule, episode))| ((rule, server), episode));
            // Per (rule, minute), every server's value; then one value per minute of the fleet.
            let fleet_rules = rules.clone();
            let fleet_values = minutes.clone().flat_map(move |(_, (minute, row))| {
                let mut out = Vec::new();
                for (i, rule) in fleet_rules.rules.iter().enumerate() {
                    if let Condition::Threshold { metric, aggregate, fleet: Some(_), .. } = rule.condition {
                        if let Some(v) = row.aggs.get(metric).and_then(|a| a.value(aggregate)) {
                            out.push(((i as u16, minute), Num(v)));
                        }
                    }
                }
                out
            });
            let reduce_rules = rules.clone();
            let fleet_series = fleet_values
                .reduce(move |&(rule, _), servers, out| {
                    let Condition::Threshold { fleet: Some(fleet), .. } = reduce_rules.rules[rule as usize].condition
                    else {
                        return;
                    };
                    // Sorted ascending; a server with several equal values counts each.
                    let mut values = Vec::with_capacity(servers.len());
                    for (v, n) in servers {
                        values.extend(std::iter::repeat_n(v.0, (*n).max(0) as usize));
                    }
                    if !values.is_empty() {
                        out.push((Num(fleet.of(&values)), 1));
                    }
                })
                .map(|((rule, minute), value)| ((rule, FLEET.to_owned()), (minute, Some(value))));

            let episode_rules = rules.clone();
            let window_minutes = rules.window_minutes.max(1);
            let fleet_episodes =
                fleet_series.reduce(move |&(rule, _): &AlertKey, minutes: &[(&(i64, Option<Num>), isize)], out| {
                    let Condition::Threshold { compare, for_minutes, .. } =
                        episode_rules.rules[rule as usize].condition
                    else {
                        return;
                    };
                    // Parts of old minutes may linger on a worker that saw no newer data.
                    let newest = minutes.last().map_or(0, |((m, _), _)| *m);
                    let oldest = newest - i64::from(window_minutes) * MINUTE_US;
                    let series = minutes
                        .iter()
                        .filter(|((minute, _), _)| *minute >= oldest)
                        .map(|((minute, value), _)| (*minute, value.map(|v| v.0)));
                    for episode in threshold_episodes(compare, for_minutes, series) {
                        out.push((episode, 1));
                    }
                });

            // Silence: each server's newest report against the clock.
            let silence_rules = rules.clone();
            let last_seen = minutes
                .map(|(server, (_, row))| (server, row.last_us))
                .reduce(|_, times: &[(&i64, isize)], out| out.push((*times[times.len() - 1].0, 1)));
            let silent = last_seen.map(|seen| ((), seen)).join(clock.map(|now| ((), now))).flat_map(
                move |((), ((server, last_us), now_ms))| {
                    let quiet_ms = (now_ms as i64).saturating_sub(last_us.div_euclid(1000));
                    let mut out = Vec::new();
                    if quiet_ms > silence_rules.forget_after_ms as i64 {
                        return out;
                    }
                    for (i, rule) in silence_rules.rules.iter().enumerate() {
                        if let Condition::Silent { after_ms } = rule.condition {
                            if quiet_ms >= after_ms as i64 {
                                let started_us = last_us.saturating_add(after_ms as i64 * 1000);
                                let episode = Episode { started_us, ended_us: None, value: None };
                                out.push(((i as u16, server.clone()), episode));
                            }
                        }
                    }
                    out
                },
            );

            let sink = output.clone();
            server_episodes
                .concat(fleet_episodes)
                .concat(silent)
                .consolidate()
                .inner
                .exchange(|_| 0)
                .inspect_core(move |event| {
                    if let Ok((_, data)) = event {
                        let mut sink = sink.borrow_mut();
                        sink.extend(data.iter().map(|((key, episode), t, r)| (key.clone(), episode.clone(), *t, *r)));
                    }
                })
                .probe_with(&probe);
            (minutes_input, clock_input)
        });
        AlertFeeder {
            rules,
            minutes,
            worker: worker.index() as u32,
            clock,
            feeds_clock,
            clock_value: None,
            pending_clock: None,
            clock_started,
            now_ms,
            window: HashMap::new(),
            probe,
            output,
            last_sweep_ms: 0,
            ignored_late: 0,
            ignored_servers: 0,
        }
    }

    /// The rules evaluated.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Adds what a transaction committed (or, at start, what is durable) for one server's
    /// minute. Minutes older than the window behind the server's newest are ignored, and so
    /// are the reports of a server not seen within `forget_after` (a backfill of old data
    /// raises no alert, as a restart, which reloads only servers seen within it, would not).
    pub fn apply(&mut self, server: &str, minute: i64, row: &MinuteRow) {
        let forget_before_us = (self.now_ms.saturating_sub(self.rules.forget_after_ms) as i64).saturating_mul(1000);
        let seen_us = self.window.get(server).and_then(|m| m.last_key_value()).map_or(i64::MIN, |(_, r)| r.last_us);
        if row.last_us.max(seen_us) < forget_before_us {
            self.ignored_late += 1;
            return;
        }
        let window_us = i64::from(self.rules.window_minutes.max(1)) * MINUTE_US;
        let full = self.window.len() >= self.rules.max_servers;
        let minutes = match self.window.get_mut(server) {
            Some(minutes) => minutes,
            None if full => {
                self.ignored_servers += 1;
                return;
            }
            None => self.window.entry(server.to_owned()).or_default(),
        };
        let newest = minutes.last_key_value().map_or(minute, |(m, _)| (*m).max(minute));
        if minute < newest - window_us {
            self.ignored_late += 1;
            return;
        }
        let slot = minutes.entry(minute).or_default();
        if slot.count > 0 {
            self.minutes.update((server.to_owned(), (minute, self.worker, slot.clone())), -1);
        }
        slot.merge(row);
        self.minutes.update((server.to_owned(), (minute, self.worker, slot.clone())), 1);
        // Minutes that fell out of the window behind the new newest one.
        while let Some(entry) = minutes.first_entry() {
            if *entry.key() >= newest - window_us {
                break;
            }
            let (old, row) = entry.remove_entry();
            self.minutes.update((server.to_owned(), (old, self.worker, row)), -1);
        }
    }

    /// Moves time on: the dataflow's timestamp (milliseconds, non-decreasing), this worker's
    /// clock (seconds resolution) to `reading`, and every few seconds forgets servers not
    /// heard from for `forget_after`. Call it after applying what the writers committed.
    ///
    /// `reading` is the latest moment (ms) at which this worker had read its partitions to
    /// the end and everything it had read by then is durable (`Ingest::durable_reading`):
    /// read to the end is not enough, a backlog is read up to the in-flight bound of epochs
    /// ahead of the database, minutes of event time, and every server in it would look
    /// silent. Even then the reading is fed only once every worker's input has passed the
    /// time this tick took it at: another worker applies what its writer committed at its
    /// next turn, and until then its servers' newest minutes are missing. `now_ms` must be
    /// read after the durable frontier the reading relies on.
    pub fn tick(&mut self, now_ms: u64, reading: Option<u64>) {
        let now_ms = now_ms.max(*self.minutes.time());
        self.now_ms = self.now_ms.max(now_ms);
        if now_ms.saturating_sub(self.last_sweep_ms) >= 5_000 {
            self.last_sweep_ms = now_ms;
            let forget_before_us = (now_ms.saturating_sub(self.rules.forget_after_ms) as i64).saturating_mul(1000);
            let (minutes, me) = (&mut self.minutes, self.worker);
            self.window.retain(|server, rows| {
                let last_us = rows.values().map(|r| r.last_us).max().unwrap_or(i64::MIN);
                if last_us >= forget_before_us {
                    return true;
                }
                for (minute, row) in std::mem::take(rows) {
                    minutes.update((server.clone(), (minute, me, row)), -1);
                }
                false
            });
        }
        // A reading is only taken when it is newer than the clock fed (below).
        if let Some((_, second)) = self.pending_clock.filter(|(taken_at, _)| self.evaluated_through(*taken_at)) {
            self.pending_clock = None;
            if let Some(old) = self.clock_value.replace(second) {
                self.clock.update((self.worker, old), -1);
            }
            self.clock.update((self.worker, second), 1);
        }
        // Time moves in whole seconds: every reduction runs once per changed key and
        // timestamp, so coarse timestamps let a burst of commits to a server's minutes
        // cost one evaluation instead of one per transaction (rules read whole minutes).
        let time = now_ms / TICK_MS * TICK_MS;
        if time > *self.minutes.time() {
            self.minutes.advance_to(time);
            self.clock.advance_to(time);
        }
        if let Some(second) = reading.map(|ms| ms / 1000 * 1000).filter(|_| self.feeds_clock) {
            if self.pending_clock.is_none() && self.clock_value.is_none_or(|fed| second > fed) {
                self.pending_clock = Some((*self.minutes.time(), second));
            }
        }
        self.minutes.flush();
        self.clock.flush();
    }

    /// Whether everything fed at or before `time` has been evaluated, on every worker.
    pub fn evaluated_through(&self, time: u64) -> bool {
        !self.probe.less_equal(&time)
    }

    /// Whether the durable state loaded at start has been fully evaluated: every rule's
    /// episodes stand as they will after a restart. With silence rules that takes the
    /// fleet's clock, which exists once every worker has caught up with its partitions.
    pub fn rebuilt(&self) -> bool {
        if !self.evaluated_through(0) {
            return false;
        }
        !self.feeds_clock || self.clock_started.get().is_some_and(|t| self.evaluated_through(t))
    }

    /// Whether everything fed before the current time has been evaluated, on every worker.
    pub fn caught_up(&self) -> bool {
        !self.probe.less_than(self.minutes.time())
    }

    /// On worker 0: the changes of the episodes, per completed timestamp in time order,
    /// consolidated. Empty on the other workers.
    pub fn changes(&mut self) -> Vec<Changes> {
        take_changes(&self.output, |t| !self.probe.less_equal(t))
    }

    /// Servers and minutes held (for the job's memory figures).
    pub fn held(&self) -> (usize, usize) {
        (self.window.len(), self.window.values().map(BTreeMap::len).sum())
    }

    /// Closes the inputs: once every worker closed them, the probe is done and
    /// [`changes`](Self::changes) hands out the last episodes.
    pub fn close(self) -> ClosedFeeder {
        ClosedFeeder { probe: self.probe, output: self.output }
    }
}

/// An [`AlertFeeder`] whose inputs are closed, draining.
pub struct ClosedFeeder {
    probe: ProbeHandle<u64>,
    output: Rc<RefCell<Vec<Update>>>,
}

impl ClosedFeeder {
    /// Whether every worker closed its inputs and everything was evaluated.
    pub fn done(&self) -> bool {
        self.probe.done()
    }

    /// The changes not handed out yet (all of them once [`done`](Self::done)).
    pub fn changes(&mut self) -> Vec<Changes> {
        take_changes(&self.output, |t| !self.probe.less_equal(t))
    }
}

/// Takes the updates whose time `ready` says is complete, grouped per time in time order,
/// each group consolidated.
fn take_changes(output: &RefCell<Vec<Update>>, ready: impl Fn(&u64) -> bool) -> Vec<Changes> {
    let mut output = output.borrow_mut();
    if output.is_empty() {
        return Vec::new();
    }
    let (mut done, pending): (Vec<Update>, Vec<Update>) = output.drain(..).partition(|u| ready(&u.2));
    *output = pending;
    done.sort_by(|a, b| (a.2, &a.0, &a.1).cmp(&(b.2, &b.0, &b.1)));
    let mut by_time: Vec<Changes> = Vec::new();
    for (key, episode, time, diff) in done {
        if by_time.last().is_none_or(|(t, _)| *t != time) {
            by_time.push((time, Vec::new()));
        }
        let changes = &mut by_time.last_mut().expect("pushed above").1;
        match changes.last_mut() {
            Some((k, e, d)) if *k == key && *e == episode => *d += diff,
            _ => changes.push((key, episode, diff)),
        }
    }
    for (_, changes) in &mut by_time {
        changes.retain(|(_, _, d)| *d != 0);
    }
    by_time.retain(|(_, changes)| !changes.is_empty());
    by_time
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = MINUTE_US;

    fn hot(minutes: &[(i64, f64)]) -> Vec<(i64, Option<f64>)> {
        minutes.iter().map(|&(m, v)| (m * M, Some(v))).collect()
    }

    #[test]
    fn three_hot_complete_minutes_make_one_episode_that_ends_with_the_first_cool_one() {
        let series = hot(&[(0, 95.0), (1, 96.0), (2, 97.0), (3, 50.0), (4, 50.0)]);
        let episodes = threshold_episodes(Comparison::Above(90.0), 3, series);
        assert_eq!(episodes, vec![Episode { started_us: 0, ended_us: Some(3 * M), value: Some(Num(97.0)) }]);
    }

    #[test]
    fn a_run_reaching_the_incomplete_newest_minute_stays_open() {
        let series = hot(&[(0, 95.0), (1, 96.0), (2, 97.0), (3, 10.0)]);
        let episodes = threshold_episodes(Comparison::Above(90.0), 3, series);
        assert_eq!(episodes, vec![Episode { started_us: 0, ended_us: None, value: Some(Num(97.0)) }]);
        // Two hot minutes and the third still incomplete: nothing yet.
        let series = hot(&[(0, 95.0), (1, 96.0), (2, 97.0)]);
        assert!(threshold_episodes(Comparison::Above(90.0), 3, series).is_empty());
    }

    #[test]
    fn a_minute_without_a_report_or_without_the_metric_ends_a_run() {
        let series = hot(&[(0, 95.0), (1, 96.0), (2, 97.0), (4, 99.0), (5, 99.0)]);
        let episodes = threshold_episodes(Comparison::Above(90.0), 3, series);
        assert_eq!(episodes, vec![Episode { started_us: 0, ended_us: Some(3 * M), value: Some(Num(97.0)) }]);
        let mut series = hot(&[(0, 95.0), (1, 96.0), (2, 97.0), (4, 99.0)]);
        series.insert(3, (3 * M, None));
        assert_eq!(threshold_episodes(Comparison::Above(90.0), 3, series)[0].ended_us, Some(3 * M));
    }

    #[test]
    fn below_thresholds_and_short_runs() {
        let series = hot(&[(0, 5.0), (1, 4.0), (2, 50.0), (3, 3.0), (4, 2.0), (5, 1.0), (6, 0.0)]);
        let episodes = threshold_episodes(Comparison::Below(10.0), 2, series);
        let starts: Vec<_> = episodes.iter().map(|e| (e.started_us / M, e.ended_us.map(|t| t / M))).collect();
        assert_eq!(starts, vec![(0, Some(2)), (3, None)]);
        assert!(threshold_episodes(Comparison::Above(10.0), 2, hot(&[(0, 50.0), (1, 5.0), (2, 50.0)])).is_empty());
    }

    #[test]
    fn fleet_quantiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(FleetAggregate::Quantile(0.95).of(&values), 95.0);
        assert_eq!(FleetAggregate::Quantile(0.5).of(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(FleetAggregate::Quantile(1.0).of(&[1.0, 2.0, 3.0]), 3.0);
        assert_eq!(FleetAggregate::Avg.of(&[1.0, 2.0, 6.0]), 3.0);
    }

    fn rules() -> Arc<Rules> {
        let threshold = |name: &str, fleet, for_minutes| Rule {
            name: name.into(),
            condition: Condition::Threshold {
                metric: 0,
                aggregate: Aggregate::Avg,
                fleet,
                compare: Comparison::Above(90.0),
                for_minutes,
            },
        };
        Arc::new(Rules {
            rules: vec![
                threshold("cpu-hot", None, 3),
                Rule { name: "silent".into(), condition: Condition::Silent { after_ms: 30_000 } },
                threshold("fleet-hot", Some(FleetAggregate::Max), 2),
            ],
            metrics: vec!["cpu".into()],
            window_minutes: 10,
            forget_after_ms: 3_600_000,
            max_servers: 3,
        })
    }

    fn row(cpu: f64, last_us: i64) -> MinuteRow {
        let mut agg = Agg::default();
        agg.add(cpu);
        MinuteRow { count: 1, last_us, aggs: vec![agg] }
    }

    /// Runs `steps` on one worker: each step feeds rows (server, minute, cpu) at a clock
    /// time (ms) and returns the episodes after it (accumulated), per (rule name, server).
    /// (clock ms, rows (server, minute, cpu) fed at it).
    type Step = (u64, Vec<(&'static str, i64, f64)>);

    fn run(steps: Vec<Step>) -> Vec<Vec<(String, String, Episode)>> {
        timely::execute_directly(move |worker| {
            let mut feeder = AlertFeeder::build(worker, rules(), 0);
            let mut state: BTreeMap<(AlertKey, Episode), isize> = BTreeMap::new();
            let mut seen = Vec::new();
            for (now_ms, rows) in steps {
                for (server, minute, cpu) in rows {
                    feeder.apply(server, minute * M, &row(cpu, minute * M + 1));
                }
                tick_until_fed(worker, &mut feeder, now_ms);
                for (_, changes) in feeder.changes() {
                    for (key, episode, diff) in changes {
                        *state.entry((key, episode)).or_default() += diff;
                    }
                }
                state.retain(|_, d| *d != 0);
                assert!(state.values().all(|d| *d == 1), "each episode exactly once: {state:?}");
                let rules = rules();
                seen.push(
                    state
                        .keys()
                        .map(|((rule, server), e)| {
                            (rules.rules[*rule as usize].name.clone(), server.clone(), e.clone())
                        })
                        .collect(),
                );
            }
            seen
        })
    }

    fn names(step: &[(String, String, Episode)]) -> Vec<(&str, &str, Option<i64>)> {
        step.iter().map(|(r, s, e)| (r.as_str(), s.as_str(), e.ended_us.map(|t| t / M))).collect()
    }

    #[test]
    fn an_alert_fires_as_data_arrives_and_resolves_when_the_server_cools() {
        // Clock at minute 10: the data below is minutes old, so only event time decides.
        let clock = 10 * 60_000;
        let seen = run(vec![
            (clock, vec![("a", 0, 95.0), ("a", 1, 95.0), ("a", 2, 95.0)]),
            (clock + 1_000, vec![("a", 3, 95.0)]),
            (clock + 2_000, vec![("a", 4, 20.0), ("a", 5, 20.0)]),
        ]);
        let hot: Vec<_> =
            seen.iter().map(|s| names(s).into_iter().filter(|n| n.0 == "cpu-hot").collect::<Vec<_>>()).collect();
        assert_eq!(hot[0], vec![], "minute 2 is not complete yet");
        assert_eq!(hot[1], vec![("cpu-hot", "a", None)]);
        assert_eq!(hot[2], vec![("cpu-hot", "a", Some(4))]);
    }

    #[test]
    fn a_late_record_that_changes_a_closed_minute_changes_the_outcome() {
        let clock = 10 * 60_000;
        let seen = run(vec![
            (
                clock,
                vec![("a", 0, 95.0), ("a", 1, 95.0), ("a", 2, 50.0), ("a", 3, 95.0), ("a", 4, 50.0), ("a", 5, 50.0)],
            ),
            // Minute 2 gets a late, very hot report: its average goes above 90.
            (clock + 1_000, vec![("a", 2, 190.0)]),
        ]);
        assert!(names(&seen[0]).iter().all(|n| n.0 != "cpu-hot"));
        assert!(names(&seen[1]).contains(&("cpu-hot", "a", Some(4))), "{:?}", seen[1]);
        let episode = &seen[1].iter().find(|s| s.0 == "cpu-hot").unwrap().2;
        assert_eq!(episode.started_us, 0);
    }

    #[test]
    fn a_server_that_stops_reporting_becomes_silent_by_the_clock_and_recovers() {
        let last = 10 * 60_000; // the report at minute 10 (+1 µs)
        let seen = run(vec![
            (last as u64 + 5_000, vec![("a", 10, 10.0), ("b", 10, 10.0)]),
            (last as u64 + 31_000, vec![("b", 10, 10.0)]),
            (last as u64 + 40_000, vec![("a", 11, 10.0)]),
        ]);
        let silent = |step: &[(String, String, Episode)]| {
            step.iter().filter(|s| s.0 == "silent").map(|s| s.1.clone()).collect::<Vec<_>>()
        };
        assert!(silent(&seen[0]).is_empty());
        // b's second report is in the same minute: its newest report is just as old.
        assert_eq!(silent(&seen[1]), vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(silent(&seen[2]), vec!["b".to_owned()], "a reported again");
        let a = seen[1].iter().find(|s| s.0 == "silent" && s.1 == "a").unwrap();
        assert_eq!(a.2.started_us, last * 1000 + 1 + 30_000_000);
    }

    #[test]
    fn fleet_rules_reduce_every_server_per_minute() {
        let clock = 10 * 60_000;
        let seen = run(vec![(
            clock,
            vec![
                ("a", 0, 10.0),
                ("b", 0, 95.0),
                ("a", 1, 10.0),
                ("b", 1, 95.0),
                ("a", 2, 10.0),
                ("b", 2, 10.0),
                ("a", 3, 10.0),
            ],
        )]);
        assert!(names(&seen[0]).contains(&("fleet-hot", FLEET, Some(2))), "{:?}", seen[0]);
        assert!(names(&seen[0]).iter().all(|n| n.0 != "cpu-hot"));
    }

    #[test]
    fn minutes_older_than_the_window_are_ignored_and_forgotten() {
        timely::execute_directly(|worker| {
            let mut feeder = AlertFeeder::build(worker, rules(), 0);
            feeder.apply("a", 20 * M, &row(1.0, 20 * M));
            feeder.apply("a", 5 * M, &row(1.0, 5 * M));
            assert_eq!(feeder.ignored_late, 1);
            feeder.apply("a", 31 * M, &row(1.0, 31 * M));
            assert_eq!(feeder.held(), (1, 1), "minute 20 fell out of the 10-minute window");
            // An hour and more later by the clock, the server is forgotten.
            feeder.tick((31 * 60_000 + 3_600_001) as u64, None);
            assert_eq!(feeder.held(), (0, 0));
            // Reports older than that are not taken at all (a backfill raises no alert).
            feeder.apply("b", 20 * M, &row(99.0, 20 * M));
            assert_eq!((feeder.held(), feeder.ignored_late), ((0, 0), 2));
        });
    }

    #[test]
    fn a_flood_of_new_servers_stops_at_the_bound_and_known_servers_go_on() {
        timely::execute_directly(|worker| {
            let mut feeder = AlertFeeder::build(worker, rules(), 0);
            for server in ["a", "b", "c", "d", "e"] {
                feeder.apply(server, 20 * M, &row(1.0, 20 * M));
            }
            assert_eq!((feeder.held(), feeder.ignored_servers), ((3, 3), 2), "three servers at most");
            feeder.apply("a", 21 * M, &row(1.0, 21 * M));
            assert_eq!((feeder.held(), feeder.ignored_servers), ((3, 4), 2), "a server already held goes on");
        });
    }

    /// Steps the worker until everything fed is evaluated.
    fn settle(worker: &mut Worker, feeder: &AlertFeeder) {
        while !feeder.caught_up() {
            worker.step();
        }
    }

    /// A caught-up tick at `now_ms`, then the ticks that feed its clock reading (one that
    /// moves the input past the time the reading was taken at, one that feeds it and moves
    /// on so it is evaluated), each evaluated.
    fn tick_until_fed(worker: &mut Worker, feeder: &mut AlertFeeder, now_ms: u64) {
        feeder.tick(now_ms, Some(now_ms));
        settle(worker, feeder);
        for later in [TICK_MS, 2 * TICK_MS] {
            feeder.tick(now_ms + later, None);
            settle(worker, feeder);
        }
    }

    /// Steps the worker until everything fed is evaluated; returns the silent servers.
    fn silent_now(worker: &mut Worker, feeder: &mut AlertFeeder, silent: &mut BTreeMap<String, isize>) -> Vec<String> {
        settle(worker, feeder);
        for (_, changes) in feeder.changes() {
            for (key, _, diff) in changes.into_iter().filter(|c| c.0 .0 == 1) {
                *silent.entry(key.1).or_default() += diff;
            }
        }
        silent.retain(|_, d| *d != 0);
        silent.keys().cloned().collect()
    }

    #[test]
    fn a_worker_behind_its_partitions_holds_the_clock_so_a_backlog_raises_no_silence() {
        timely::execute_directly(|worker| {
            let mut feeder = AlertFeeder::build(worker, rules(), 0);
            let mut silent = BTreeMap::new();
            // Reloaded at start: a and b last reported at minute 10.
            feeder.apply("a", 10 * M, &row(1.0, 10 * M));
            feeder.apply("b", 10 * M, &row(1.0, 10 * M));
            // Five minutes later by the wall clock, still reading the backlog: no clock yet.
            let later = (15 * 60_000) as u64;
            feeder.tick(later, None);
            assert!(silent_now(worker, &mut feeder, &mut silent).is_empty());
            assert!(!feeder.rebuilt(), "silence rules are not evaluated before the clock exists");
            // The backlog brings a up to date; then the worker reaches the end of its partitions.
            feeder.apply("a", 14 * M, &row(1.0, 15 * M - 10_000_000));
            feeder.tick(later + 1_000, None);
            assert!(silent_now(worker, &mut feeder, &mut silent).is_empty());
            feeder.tick(later + 2_000, Some(later + 2_000));
            assert!(
                silent_now(worker, &mut feeder, &mut silent).is_empty(),
                "the reading waits until every worker applied what was committed before it"
            );
            feeder.tick(later + 3_000, None);
            assert!(silent_now(worker, &mut feeder, &mut silent).is_empty());
            feeder.tick(later + 4_000, None);
            assert_eq!(silent_now(worker, &mut feeder, &mut silent), vec!["b".to_owned()]);
            assert!(feeder.rebuilt());
            // Behind again (a burst): the clock stays, and what fired stays fired.
            feeder.tick(later + 120_000, Some(later + 2_000));
            assert_eq!(silent_now(worker, &mut feeder, &mut silent), vec!["b".to_owned()]);
            tick_until_fed(worker, &mut feeder, later + 121_000);
            assert_eq!(silent_now(worker, &mut feeder, &mut silent), vec!["a".to_owned(), "b".to_owned()]);
        });
    }
}
