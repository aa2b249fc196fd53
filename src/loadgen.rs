//! A simulated fleet: `servers` servers (s1..sN) each reporting every `interval`, with
//! per-server random-walk metrics, deterministic for a seed. Produces straight to Kafka.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::cli::LoadgenArgs;

/// One simulated server's current readings.
#[derive(Clone, Debug)]
struct ServerState {
    cpu: f64,
    ram: f64,
    disk: f64,
    net_in: f64,
    load1: f64,
}

/// Generates the fleet's reports in round-robin order: record `i` is server `i % servers`,
/// round `i / servers`. Every (serverId, ts) pair is distinct.
pub struct Fleet {
    servers: Vec<ServerState>,
    rng: fastrand::Rng,
    interval_ms: i64,
    start_ms: i64,
    next: u64,
    bad_fraction: f64,
    duplicate_fraction: f64,
    last: Option<(String, String)>,
    /// Records sent a second time so far.
    pub duplicates: u64,
}

impl Fleet {
    pub fn new(servers: u32, interval: Duration, start_ms: i64, seed: u64, bad_fraction: f64) -> Fleet {
        Fleet::with_duplicates(servers, interval, start_ms, seed, bad_fraction, 0.0)
    }

    /// Like [`Fleet::new`], and also repeats a fraction of the records (a retrying producer).
    pub fn with_duplicates(
        servers: u32,
        interval: Duration,
        start_ms: i64,
        seed: u64,
        bad_fraction: f64,
        duplicate_fraction: f64,
    ) -> Fleet {
        let mut rng = fastrand::Rng::with_seed(seed);
        let servers = (0..servers.max(1))
            .map(|_| ServerState {
                cpu: rng.f64() * 60.0 + 5.0,
                ram: rng.f64() * 50.0 + 20.0,
                disk: rng.f64() * 70.0 + 10.0,
                net_in: rng.f64() * 5000.0,
                load1: rng.f64() * 4.0,
            })
            .collect();
        Fleet {
            servers,
            rng,
            interval_ms: interval.as_millis().max(1) as i64,
            start_ms,
            next: 0,
            bad_fraction,
            duplicate_fraction,
            last: None,
            duplicates: 0,
        }
    }

    /// The next report: (key = serverId, JSON payload).
    pub fn next_record(&mut self) -> (String, String) {
        if self.duplicate_fraction > 0.0 && self.rng.f64() < self.duplicate_fraction {
            if let Some(last) = self.last.take() {
                self.duplicates += 1;
                return last;
            }
        }
        let record = self.fresh_record();
        if self.duplicate_fraction > 0.0 {
            self.last = Some(record.clone());
        }
        record
    }

    fn fresh_record(&mut self) -> (String, String) {
        let n = self.servers.len() as u64;
        let (index, round) = ((self.next % n) as usize, (self.next / n) as i64);
        self.next += 1;
        let server_id = format!("s{}", index + 1);
        // Servers are spread over the interval, as a real fleet's clocks would be.
        let ts = self.start_ms + round * self.interval_ms + (index as i64 * self.interval_ms) / n as i64;
        let rng = &mut self.rng;
        let s = &mut self.servers[index];
        let walk = |v: &mut f64, step: f64, lo: f64, hi: f64, rng: &mut fastrand::Rng| {
            *v = (*v + (rng.f64() * 2.0 - 1.0) * step).clamp(lo, hi);
        };
        walk(&mut s.cpu, 5.0, 0.0, 100.0, rng);
        walk(&mut s.ram, 2.0, 0.0, 100.0, rng);
        walk(&mut s.disk, 0.5, 0.0, 100.0, rng);
        walk(&mut s.net_in, 300.0, 0.0, 100_000.0, rng);
        walk(&mut s.load1, 0.3, 0.0, 64.0, rng);
        if self.bad_fraction > 0.0 && self.rng.f64() < self.bad_fraction {
            let bad = match self.rng.u8(0..4) {
                0 => format!(r#"{{"serverId":"{server_id}","cpu":"high","ts":{ts}}}"#),
                1 => format!(r#"{{"serverId":"{server_id}","cpu":45,"ram""#),
                2 => format!(r#"{{"cpu":45,"ram":60,"ts":{ts}}}"#),
                _ => "[1,2,3]".to_owned(),
            };
            return (server_id, bad);
        }
        let payload = format!(
            r#"{{"serverId":"{server_id}","ts":{ts},"cpu":{:.1},"ram":{:.1},"disk":{:.1},"net_in":{:.0},"load1":{:.2}}}"#,
            s.cpu, s.ram, s.disk, s.net_in, s.load1
        );
        (server_id, payload)
    }
}

/// Delivery reports, counted.
#[derive(Default)]
pub struct Deliveries {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
}

/// What a loadgen run did.
#[derive(Debug, Clone)]
pub struct LoadgenReport {
    pub sent: u64,
    pub delivered: u64,
    pub failed: u64,
    /// Records among `sent` that repeat an earlier one (`--duplicate-fraction`).
    pub duplicates: u64,
    /// Records the gateway refused as invalid (with `--gateway`; expected with `--bad-fraction`).
    pub rejected: u64,
    pub seconds: f64,
}

impl LoadgenArgs {
    /// `count` records of `servers` simulated servers straight to Kafka, as fast as possible,
    /// a report every 10 s per server, none malformed or repeated: what the tests and the
    /// benchmark produce (they change fields from here).
    pub fn straight_to_kafka(kafka: crate::cli::KafkaArgs, servers: u32, count: u64, seed: u64) -> LoadgenArgs {
        LoadgenArgs {
            kafka,
            servers,
            interval: Duration::from_secs(10),
            count: Some(count),
            rate: None,
            seed,
            start_time: None,
            bad_fraction: 0.0,
            duplicate_fraction: 0.0,
            gateway: None,
            token: None,
            http_batch: 500,
            connections: 1,
        }
    }
}

/// Produces the fleet's records until `--count` is reached or `stop` is set: to Kafka, or
/// through the gateway with `--gateway`.
pub fn produce(args: &LoadgenArgs, stop: &AtomicBool) -> anyhow::Result<LoadgenReport> {
    if let Some(url) = &args.gateway {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        return runtime.block_on(produce_http(args, url, stop));
    }
    // An unreachable broker or a missing topic is one clear line now, not a minute of
    // unacknowledged sends.
    crate::kafka::admin::partition_count(&args.kafka.clone().into())?;
    produce_kafka(args, stop)
}

/// When the first round starts and how fast to send, from the flags.
fn plan(args: &LoadgenArgs) -> anyhow::Result<(i64, Option<f64>)> {
    let servers = args.servers.max(1);
    let interval_ms = args.interval.as_millis() as i64;
    let start_ms = match &args.start_time {
        Some(t) => chrono::DateTime::parse_from_rfc3339(t)
            .with_context(|| format!("--start-time {t:?} is not RFC 3339"))?
            .timestamp_millis(),
        None => {
            // Rounds end at "now" at the latest, so the job's future bound never rejects them.
            let rounds = args.count.map(|c| c.div_ceil(servers as u64) as i64).unwrap_or(0);
            crate::record::now_ms() - rounds * interval_ms
        }
    };
    // Without --count and --rate, servers report at their real cadence.
    let rate = args.rate.or_else(|| args.count.is_none().then(|| servers as f64 / args.interval.as_secs_f64()));
    Ok((start_ms, rate))
}

fn fleet_for(args: &LoadgenArgs, start_ms: i64) -> Fleet {
    Fleet::with_duplicates(
        args.servers.max(1),
        args.interval,
        start_ms,
        args.seed,
        args.bad_fraction,
        args.duplicate_fraction,
    )
}

/// Sleeps until record number `sent` is due at `rate` records/s.
async fn pace(started: Instant, sent: u64, rate: Option<f64>) {
    if let Some(rate) = rate {
        let due = Duration::from_secs_f64(sent as f64 / rate);
        let elapsed = started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// Sends batches of NDJSON to the gateway over `--connections` keep-alive connections. As a
/// well-behaved client does, it sends again only the records the reply lists under `retry`
/// (certainly not stored) and `unknown` (Kafka did not answer in time), after Retry-After.
async fn produce_http(args: &LoadgenArgs, url: &str, stop: &AtomicBool) -> anyhow::Result<LoadgenReport> {
    let (start_ms, rate) = plan(args)?;
    let fleet = std::sync::Mutex::new(fleet_for(args, start_ms));
    let endpoint = format!("{}/v1/metrics", url.trim_end_matches('/'));
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.connections).build()?;
    let sent = AtomicU64::new(0);
    let accepted = AtomicU64::new(0);
    let rejected = AtomicU64::new(0);
    let started = Instant::now();
    let worker = || async {
        loop {
            let body = {
                let mut fleet = fleet.lock().expect("fleet lock");
                let already = sent.load(Ordering::Relaxed);
                let room = args
                    .count
                    .map_or(args.http_batch as u64, |c| c.saturating_sub(already).min(args.http_batch as u64));
                if room == 0 || stop.load(Ordering::Relaxed) {
                    return Ok::<(), anyhow::Error>(());
                }
                sent.fetch_add(room, Ordering::Relaxed);
                (0..room).map(|_| fleet.next_record().1).collect::<Vec<String>>()
            };
            pace(started, sent.load(Ordering::Relaxed), rate).await;
            let mut lines = body;
            while !lines.is_empty() {
                let mut request = client
                    .post(&endpoint)
                    .header("content-type", "application/x-ndjson")
                    .body(lines.iter().map(|l| format!("{l}\n")).collect::<String>());
                if let Some(token) = &args.token {
                    request = request.bearer_auth(token);
                }
                let response =
                    request.send().await.with_context(|| format!("cannot reach the gateway at {endpoint}"))?;
                let status = response.status().as_u16();
                let retry =
                    response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1);
                let reply: serde_json::Value =
                    serde_json::from_slice(&response.bytes().await.unwrap_or_default()).unwrap_or_default();
                match status {
                    202 | 400 | 429 | 503 => {
                        accepted.fetch_add(reply["accepted"].as_u64().unwrap_or(0), Ordering::Relaxed);
                        rejected.fetch_add(reply["rejected_count"].as_u64().unwrap_or(0), Ordering::Relaxed);
                        let again: std::collections::BTreeSet<usize> = ["retry", "unknown"]
                            .iter()
                            .flat_map(|key| reply[*key].as_array().cloned().unwrap_or_default())
                            .filter_map(|i| i.as_u64().map(|i| i as usize))
                            .collect();
                        if status >= 429 && again.is_empty() {
                            // An older gateway without per-record replies: send the whole batch again.
                            tokio::time::sleep(Duration::from_secs(retry)).await;
                            continue;
                        }
                        lines = again.into_iter().filter_map(|i| lines.get(i).cloned()).collect();
                        if !lines.is_empty() {
                            tokio::time::sleep(Duration::from_secs(retry)).await;
                        }
                    }
                    other => anyhow::bail!("the gateway answered {other}: {reply}"),
                }
            }
        }
    };
    let results = futures_util::future::join_all((0..args.connections.max(1)).map(|_| worker())).await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let duplicates = fleet.lock().expect("fleet lock").duplicates;
    Ok(LoadgenReport {
        sent: sent.load(Ordering::Relaxed),
        delivered: accepted.load(Ordering::Relaxed),
        failed: 0,
        duplicates,
        rejected: rejected.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Produces straight to Kafka.
fn produce_kafka(args: &LoadgenArgs, stop: &AtomicBool) -> anyhow::Result<LoadgenReport> {
    let (start_ms, rate) = plan(args)?;
    let mut fleet = fleet_for(args, start_ms);
    let deliveries = Arc::new(Deliveries::default());
    let producer = crate::kafka::producer::producer(&args.kafka.clone().into(), ArcContext(deliveries.clone()))?;

    let started = Instant::now();
    let mut sent = 0u64;
    while args.count.is_none_or(|c| sent < c) && !stop.load(Ordering::Relaxed) {
        if let Some(rate) = rate {
            // Sleep only when a millisecond or more ahead (within the producer's linger, so
            // no later on the wire): a sleep per record cost a system call per record, and
            // half a core at 100k records/s.
            let due = Duration::from_secs_f64(sent as f64 / rate);
            let elapsed = started.elapsed();
            if due > elapsed + Duration::from_millis(1) {
                std::thread::sleep((due - elapsed).min(Duration::from_millis(100)));
                continue;
            }
        }
        let (key, payload) = fleet.next_record();
        let mut record = BaseRecord::to(&args.kafka.topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e).context("cannot produce to Kafka"),
            }
        }
        sent += 1;
    }
    producer.flush(Duration::from_secs(60)).context("Kafka did not acknowledge every record within 60 s")?;
    Ok(LoadgenReport {
        sent,
        delivered: deliveries.delivered.load(Ordering::Relaxed),
        failed: deliveries.failed.load(Ordering::Relaxed),
        duplicates: fleet.duplicates,
        rejected: 0,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The producer context: counts into a [`Deliveries`] the caller can read.
pub struct ArcContext(pub Arc<Deliveries>);

impl ClientContext for ArcContext {}

impl ProducerContext for ArcContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.delivered.fetch_add(1, Ordering::Relaxed),
            Err((e, _)) => {
                tracing::warn!(error = %e, "delivery failed");
                self.0.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{decode, Limits};

    #[test]
    fn same_seed_same_records() {
        let mut a = Fleet::new(10, Duration::from_secs(10), 1_700_000_000_000, 7, 0.0);
        let mut b = Fleet::new(10, Duration::from_secs(10), 1_700_000_000_000, 7, 0.0);
        for _ in 0..100 {
            assert_eq!(a.next_record(), b.next_record());
        }
    }

    #[test]
    fn records_decode_and_have_distinct_server_times() {
        let start = 1_700_000_000_000;
        let mut fleet = Fleet::new(7, Duration::from_secs(10), start, 1, 0.0);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..700 {
            let (key, payload) = fleet.next_record();
            let m =
                decode(payload.as_bytes(), Some(key.as_bytes()), None, start + 86_400_000, &Limits::default()).unwrap();
            assert!(seen.insert((m.server_id, m.time_us)));
            assert!((0.0..=100.0).contains(&m.cpu.unwrap()));
        }
    }

    #[test]
    fn bad_fraction_produces_undecodable_records() {
        let start = 1_700_000_000_000;
        let mut fleet = Fleet::new(5, Duration::from_secs(10), start, 3, 0.5);
        let bad = (0..1000)
            .filter(|_| {
                let (key, payload) = fleet.next_record();
                decode(payload.as_bytes(), Some(key.as_bytes()), None, start + 86_400_000, &Limits::default()).is_err()
            })
            .count();
        assert!((350..650).contains(&bad), "{bad} bad of 1000");
    }
}
