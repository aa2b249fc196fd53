//! `fleetflow gateway`: the HTTP front door in front of Kafka.
//!
//! Servers POST metric records; the gateway validates each with the job's own rules
//! (`record::decode`), applies a per-serverId token bucket and a global bound on records in
//! flight, produces the valid ones keyed by serverId (idempotent, acks=all), and answers only
//! once Kafka has answered for each. A 202 therefore means "in Kafka"; otherwise the reply
//! lists, by index, the records rejected (never to be stored), to `retry` (certainly not in
//! Kafka) and of `unknown` fate (timed out: they may be in Kafka).
//!
//! Bounded under abuse: optional tokens (`auth`), optional TLS (`tls`), our own accept loop
//! with a header timeout and a connection cap (`server`), a body read timeout and size limit,
//! a bounded gzip inflation, a cap on records per request counted while splitting, capped
//! rejection details, validation on the blocking pool, and `/healthz` from a cached check.

// Validation steps return a ready HTTP reply as their error: built once per request, on
// the way out, so its size does not matter.
#![allow(clippy::result_large_err)]

mod auth;
pub mod line_protocol;
mod server;
mod tls;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Read;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::de;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::cli::GatewayArgs;
use crate::record::{decode, now_ms, DecodeError, Limits};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The gateway's Prometheus metrics.
struct GatewayMetrics {
    registry: Registry,
    requests: Family<RouteLabels, Counter>,
    records: Family<OutcomeLabels, Counter>,
    rejections: Family<ReasonLabels, Counter>,
    produce_latency: Histogram,
    in_flight: Gauge,
}

impl GatewayMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("fleetflow_gateway");
        let requests = Family::<RouteLabels, Counter>::default();
        let records = Family::<OutcomeLabels, Counter>::default();
        let rejections = Family::<ReasonLabels, Counter>::default();
        let produce_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let in_flight = Gauge::default();
        registry.register("requests", "HTTP requests by route and status", requests.clone());
        registry.register(
            "records",
            "Records by outcome (accepted, rejected, rate_limited, overloaded, not_acknowledged); refused requests: too_many, forbidden, too_large_decompressed",
            records.clone(),
        );
        registry.register("rejections", "Rejected records by reason", rejections.clone());
        registry.register(
            "produce_latency_seconds",
            "Time from validation to Kafka's acknowledgement, per request",
            produce_latency.clone(),
        );
        registry.register("in_flight_records", "Records produced and not yet acknowledged", in_flight.clone());
        GatewayMetrics { registry, requests, records, rejections, produce_latency, in_flight }
    }

    fn count(&self, outcome: &'static str, n: usize) {
        self.records.get_or_create(&OutcomeLabels { outcome }).inc_by(n as u64);
    }
}

struct Gateway {
    producer: FutureProducer,
    topic: String,
    limits: Limits,
    rate: Option<DefaultKeyedRateLimiter<String>>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    max_records: usize,
    max_body_bytes: usize,
    max_decompressed_bytes: usize,
    max_rejection_details: usize,
    body_timeout: Duration,
    produce_timeout: Duration,
    tokens: Vec<auth::Token>,
    healthy: AtomicBool,
    metrics: GatewayMetrics,
}

/// Runs the gateway until SIGINT/SIGTERM, then stops accepting, lets open requests finish
/// (at most `--shutdown-timeout`), flushes the producer and returns.
pub async fn serve(args: GatewayArgs) -> anyhow::Result<()> {
    let tokens = auth::load(&args.tokens, args.tokens_file.as_deref())?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let kafka = crate::config::KafkaConfig::from(args.kafka.clone());
    let mut config = crate::kafka::client_config(&kafka, crate::kafka::producer::PRODUCER_DEFAULTS);
    config
        .set("linger.ms", args.linger_ms.to_string())
        .set("batch.num.messages", args.batch_records.to_string())
        .set("message.timeout.ms", args.produce_timeout.as_millis().to_string());
    // The user's -X options win over the flags above too.
    for (k, v) in &kafka.options {
        config.set(k, v);
    }
    let producer: FutureProducer = config.create().context("cannot create the Kafka producer")?;
    // Fail at start, in one line, when the broker or the topic is not there.
    tokio::task::spawn_blocking(move || crate::kafka::admin::partition_count(&kafka)).await??;

    let rate = args.rate_limit.map(|per_second| {
        let burst = NonZeroU32::new(args.rate_burst.max(1)).expect("max(1)");
        let per_second = NonZeroU32::new(per_second.max(1)).expect("max(1)");
        RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
    });
    let max_in_flight = args.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
    let gateway = Arc::new(Gateway {
        producer,
        topic: args.kafka.topic.clone(),
        limits: Limits { max_bytes: args.max_record_bytes, max_age: args.max_age, max_future: args.max_future },
        rate,
        in_flight: Arc::new(Semaphore::new(max_in_flight)),
        max_in_flight,
        max_records: args.max_records.max(1),
        max_body_bytes: args.max_body_bytes,
        max_decompressed_bytes: args.max_decompressed_bytes,
        max_rejection_details: args.max_rejection_details,
        body_timeout: args.body_timeout,
        produce_timeout: args.produce_timeout,
        tokens,
        healthy: AtomicBool::new(true),
        metrics: GatewayMetrics::new(),
    });
    // The rate limiter keeps a bucket per serverId it has seen; forget the full ones now and
    // then, so a stream of ever-new ids cannot grow memory without bound.
    let forget = Arc::downgrade(&gateway);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            let Some(gateway) = forget.upgrade() else { break };
            if let Some(rate) = &gateway.rate {
                rate.retain_recent();
                rate.shrink_to_fit();
            }
        }
    });
    // /healthz answers from this cache: a flood of health checks costs no broker round trips.
    let check = Arc::downgrade(&gateway);
    let health_interval = args.health_interval.max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(health_interval);
        loop {
            every.tick().await;
            let Some(gateway) = check.upgrade() else { break };
            let producer = gateway.producer.clone();
            let topic = gateway.topic.clone();
            let ok = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .is_ok_and(|m| m.topics().iter().any(|t| t.name() == topic && t.error().is_none()))
            })
            .await
            .unwrap_or(false);
            gateway.healthy.store(ok, Ordering::Relaxed);
        }
    });
    let app = Router::new()
        .route("/v1/metrics", post(post_json))
        .route("/api/v2/write", post(post_line_protocol))
        .route("/healthz", get(healthz))
        .route("/metrics", get(prometheus))
        .with_state(gateway.clone());

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        topic = %args.kafka.topic,
        tls = tls.is_some(),
        tokens = gateway.tokens.len(),
        "gateway listening"
    );
    server::run(listener, app, tls, &args).await;

    tracing::info!("gateway stopping: flushing the producer");
    let producer = gateway.producer.clone();
    tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(30)))
        .await?
        .context("records were still unacknowledged after 30 s")?;
    Ok(())
}

/// A reply with a JSON body.
fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn error_reply(status: StatusCode, message: String) -> Response {
    reply(status, json!({"accepted": 0, "error": message}))
}

/// `POST /v1/metrics`: one JSON object, a JSON array of objects, or newline-delimited JSON.
async fn post_json(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let response = gw.handle(&headers, body, Format::Json).await;
    gw.metrics.requests.get_or_create(&RouteLabels { route: "/v1/metrics", status: response.status().as_u16() }).inc();
    response
}

#[derive(serde::Deserialize)]
struct WriteParams {
    #[serde(default)]
    precision: line_protocol::Precision,
}

/// `POST /api/v2/write`: InfluxDB line protocol (Telegraf's `outputs.influxdb_v2`).
async fn post_line_protocol(
    State(gw): State<Arc<Gateway>>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = gw.handle(&headers, body, Format::LineProtocol(params.precision)).await;
    gw.metrics
        .requests
        .get_or_create(&RouteLabels { route: "/api/v2/write", status: response.status().as_u16() })
        .inc();
    response
}

#[derive(Clone, Copy)]
enum Format {
    Json,
    LineProtocol(line_protocol::Precision),
}

/// Why a body could not be split into records.
#[derive(Debug, PartialEq)]
pub enum SplitError {
    /// More records than the per-request limit (which it names).
    TooMany(usize),
}

/// Splits a body into the raw bytes of each record (or why a part is unusable), at most
/// `max_records` of them: the count is checked while splitting, so a body of two million
/// tiny lines costs no more than `max_records + 1` of them.
pub fn split_json_body(body: &Bytes, max_records: usize) -> Result<Vec<Result<Bytes, String>>, SplitError> {
    let text = body.trim_ascii();
    if text.first() == Some(&b'[') {
        let too_many = Cell::new(false);
        let seed = CappedArray { max: max_records, too_many: &too_many };
        let mut de = serde_json::Deserializer::from_slice(text);
        let parsed = de::DeserializeSeed::deserialize(seed, &mut de).and_then(|items| de.end().map(|()| items));
        return match parsed {
            Ok(items) => Ok(items.iter().map(|raw| Ok(Bytes::copy_from_slice(raw.get().as_bytes()))).collect()),
            Err(_) if too_many.get() => Err(SplitError::TooMany(max_records)),
            Err(e) => Ok(vec![Err(format!("malformed JSON array: {e}"))]),
        };
    }
    // One object (possibly spread over several lines) ...
    if text.first() == Some(&b'{') && serde_json::from_slice::<de::IgnoredAny>(text).is_ok() {
        return Ok(vec![Ok(body.slice_ref(text))]);
    }
    // ... or newline-delimited JSON.
    let mut out = Vec::new();
    for line in text.split(|b| *b == b'\n').map(<[u8]>::trim_ascii).filter(|line| !line.is_empty()) {
        if out.len() == max_records {
            return Err(SplitError::TooMany(max_records));
        }
        out.push(Ok(body.slice_ref(line)));
    }
    Ok(out)
}

/// A JSON array read item by item, refused once it holds more than `max` items.
struct CappedArray<'c> {
    max: usize,
    too_many: &'c Cell<bool>,
}

impl<'de> de::DeserializeSeed<'de> for CappedArray<'_> {
    type Value = Vec<&'de serde_json::value::RawValue>;
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> de::Visitor<'de> for CappedArray<'_> {
    type Value = Vec<&'de serde_json::value::RawValue>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array")
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element::<&'de serde_json::value::RawValue>()? {
            if out.len() == self.max {
                self.too_many.set(true);
                return Err(de::Error::custom("too many records"));
            }
            out.push(item);
        }
        Ok(out)
    }
}

/// Counts line-protocol lines (not blank, not comments), stopping past `max`.
fn line_protocol_lines_exceed(text: &str, max: usize) -> bool {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).take(max + 1).count() > max
}

/// Rejected records: the first few with their reason, and a count of all by reason.
#[derive(Default)]
struct Rejections {
    details: Vec<serde_json::Value>,
    max_details: usize,
    count: usize,
    by_reason: BTreeMap<&'static str, usize>,
}

impl Rejections {
    fn push(&mut self, index: usize, kind: &'static str, reason: impl FnOnce() -> String) {
        self.count += 1;
        *self.by_reason.entry(kind).or_default() += 1;
        if self.details.len() < self.max_details {
            self.details.push(json!({"index": index, "reason": reason()}));
        }
    }
}

/// What validation made of a request, before anything is produced.
struct Checked {
    /// (index in the request, key, payload) of each record to produce.
    valid: Vec<(usize, String, Bytes)>,
    rejections: Rejections,
    /// Indexes refused by the per-serverId rate limit (send again later).
    rate_limited: Vec<usize>,
    retry_after: Duration,
}

/// Puts `"ts": now_ms` first in a JSON object that has no timestamp, so a retried record
/// keeps the time of its first receipt (and `--dedup natural-key` recognises it).
fn stamp_time(raw: &[u8], now_ms: i64) -> Option<Bytes> {
    let start = raw.iter().position(|b| !b.is_ascii_whitespace())?;
    if raw[start] != b'{' {
        return None;
    }
    let rest = &raw[start + 1..];
    let empty = rest.trim_ascii_start().first() == Some(&b'}');
    let mut out = Vec::with_capacity(raw.len() + 24);
    out.extend_from_slice(format!("{{\"ts\":{now_ms}{}", if empty { "" } else { "," }).as_bytes());
    out.extend_from_slice(rest);
    Some(Bytes::from(out))
}

impl Gateway {
    async fn handle(self: &Arc<Self>, headers: &HeaderMap, body: Body, format: Format) -> Response {
        let prefix = match auth::check(&self.tokens, headers) {
            Ok(prefix) => prefix,
            Err(response) => return response,
        };
        let body = match self.read_body(headers, body).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        let gw = self.clone();
        // Decompression, splitting and validation are CPU work: off the async workers.
        let checked = tokio::task::spawn_blocking(move || gw.check(body.0, body.1, format, prefix)).await;
        let checked = match checked {
            Ok(Ok(checked)) => checked,
            Ok(Err(response)) => return response,
            Err(e) => return error_reply(StatusCode::INTERNAL_SERVER_ERROR, format!("validation failed: {e}")),
        };
        self.produce(checked).await
    }

    /// Reads the body within `--body-timeout` and `--max-body-bytes`; returns whether it is
    /// gzip-compressed, and the bytes.
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<(bool, Bytes), Response> {
        let gzip = match headers
            .get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
        {
            None => false,
            Some(e) if e.is_empty() || e == "identity" => false,
            Some(e) if e == "gzip" || e == "x-gzip" => true,
            Some(e) => {
                return Err(error_reply(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("Content-Encoding {e:?} is not supported (gzip or none)"),
                ))
            }
        };
        let too_large = || {
            error_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than the limit of {} bytes (--max-body-bytes)", self.max_body_bytes),
            )
        };
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(too_large());
        }
        let read = http_body_util::Limited::new(body, self.max_body_bytes).collect();
        match tokio::time::timeout(self.body_timeout, read).await {
            Ok(Ok(collected)) => Ok((gzip, collected.to_bytes())),
            Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
            Ok(Err(e)) => Err(error_reply(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"))),
            Err(_) => Err(error_reply(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} (--body-timeout)",
                    humantime::format_duration(self.body_timeout)
                ),
            )),
        }
    }

    /// Decompresses, splits and validates a body (blocking: run it off the async workers).
    fn check(&self, gzip: bool, body: Bytes, format: Format, prefix: Option<String>) -> Result<Checked, Response> {
        let body = if gzip { self.gunzip(&body)? } else { body };
        let too_many = |max: usize| {
            self.metrics.count("too_many", 1);
            error_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request holds more than {max} records, the limit per request (--max-records); split it"),
            )
        };
        let candidates: Vec<Result<Bytes, String>> = match format {
            Format::Json => {
                split_json_body(&body, self.max_records).map_err(|SplitError::TooMany(max)| too_many(max))?
            }
            Format::LineProtocol(precision) => {
                let text = std::str::from_utf8(&body)
                    .map_err(|_| error_reply(StatusCode::BAD_REQUEST, "body is not valid UTF-8".into()))?;
                if line_protocol_lines_exceed(text, self.max_records) {
                    return Err(too_many(self.max_records));
                }
                line_protocol::to_records(text, precision)
                    .into_iter()
                    .map(|r| r.map(String::into_bytes).map(Bytes::from))
                    .collect()
            }
        };
        let now = now_ms();
        let mut rejections = Rejections { max_details: self.max_rejection_details, ..Rejections::default() };
        let mut rate_limited = Vec::new();
        let mut retry_after = Duration::ZERO;
        let mut valid = Vec::new();
        for (index, candidate) in candidates.into_iter().enumerate() {
            let raw = match candidate {
                Ok(raw) => raw,
                Err(reason) => {
                    self.metrics.rejections.get_or_create(&ReasonLabels { reason: "malformed_json" }).inc();
                    rejections.push(index, "malformed_json", || reason);
                    continue;
                }
            };
            let (decoded, raw) = match decode(&raw, None, None, now, &self.limits) {
                Err(DecodeError::MissingTimestamp) => match stamp_time(&raw, now) {
                    Some(stamped) => (decode(&stamped, None, None, now, &self.limits), stamped),
                    None => (Err(DecodeError::MissingTimestamp), raw),
                },
                decoded => (decoded, raw),
            };
            let metric = match decoded {
                Ok(metric) => metric,
                Err(e) => {
                    self.metrics.rejections.get_or_create(&ReasonLabels { reason: e.kind() }).inc();
                    rejections.push(index, e.kind(), || e.to_string());
                    continue;
                }
            };
            if let Some(prefix) = &prefix {
                if !metric.server_id.starts_with(prefix.as_str()) {
                    self.metrics.count("forbidden", 1);
                    return Err(error_reply(
                        StatusCode::FORBIDDEN,
                        format!(
                            "record {index}: serverId {:?} is not one this token may write (serverIds starting with {prefix:?}); nothing was accepted",
                            metric.server_id
                        ),
                    ));
                }
            }
            valid.push((index, metric.server_id.into_string(), raw));
        }
        // Rate limits are taken only once the whole request is known to be allowed.
        if let Some(limiter) = &self.rate {
            valid.retain(|(index, key, _)| match limiter.check_key(key) {
                Ok(()) => true,
                Err(wait) => {
                    let wait =
                        wait.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
                    retry_after = retry_after.max(wait);
                    rate_limited.push(*index);
                    self.metrics.rejections.get_or_create(&ReasonLabels { reason: "rate_limited" }).inc();
                    false
                }
            });
        }
        self.metrics.count("rejected", rejections.count);
        self.metrics.count("rate_limited", rate_limited.len());
        Ok(Checked { valid, rejections, rate_limited, retry_after })
    }

    /// Inflates a gzip body, refusing (413) past `--max-decompressed-bytes`.
    fn gunzip(&self, body: &[u8]) -> Result<Bytes, Response> {
        let mut out = Vec::new();
        let limit = self.max_decompressed_bytes as u64;
        let mut decoder = flate2::read::MultiGzDecoder::new(body).take(limit + 1);
        match decoder.read_to_end(&mut out) {
            Ok(n) if n as u64 > limit => {
                self.metrics.count("too_large_decompressed", 1);
                Err(error_reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("gzip body inflates beyond the limit of {limit} bytes (--max-decompressed-bytes)"),
                ))
            }
            Ok(_) => Ok(Bytes::from(out)),
            Err(e) => Err(error_reply(StatusCode::BAD_REQUEST, format!("body is not valid gzip: {e}"))),
        }
    }

    /// Produces the valid records and says, per record, what became of them.
    async fn produce(&self, checked: Checked) -> Response {
        let Checked { valid, rejections, rate_limited, retry_after } = checked;
        let mut retry: Vec<usize> = rate_limited.clone();
        let mut unknown: Vec<usize> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        let mut accepted = 0usize;

        if valid.len() > self.max_in_flight {
            self.metrics.count("too_many", 1);
            return error_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request holds {} valid records, more than --max-in-flight ({}); split it",
                    valid.len(),
                    self.max_in_flight
                ),
            );
        }
        // Bounded memory: wait for room among the records in flight, not for ever.
        let permits = if valid.is_empty() {
            None
        } else {
            let acquire = self.in_flight.clone().acquire_many_owned(valid.len() as u32);
            match tokio::time::timeout(self.produce_timeout, acquire).await {
                Ok(Ok(p)) => Some(p),
                _ => {
                    self.metrics.count("overloaded", valid.len());
                    retry.extend(valid.iter().map(|(i, _, _)| *i));
                    errors.push(format!(
                        "overloaded: {} records already waiting for Kafka (--max-in-flight)",
                        self.max_in_flight
                    ));
                    None
                }
            }
        };
        if let Some(permits) = permits {
            self.metrics.in_flight.inc_by(valid.len() as i64);
            let started = Instant::now();
            let sends = valid.iter().map(|(_, key, payload)| {
                let record = FutureRecord::to(&self.topic).key(key.as_str()).payload(payload.as_ref());
                self.producer.send(record, self.produce_timeout)
            });
            let results = futures_util::future::join_all(sends).await;
            self.metrics.in_flight.dec_by(valid.len() as i64);
            drop(permits);
            self.metrics.produce_latency.observe(started.elapsed().as_secs_f64());
            for ((index, _, _), result) in valid.iter().zip(results) {
                match result {
                    Ok(_) => accepted += 1,
                    Err((e, _)) => {
                        if errors.len() < 3 {
                            errors.push(e.to_string());
                        }
                        if never_sent(&e) {
                            retry.push(*index);
                        } else {
                            unknown.push(*index);
                        }
                    }
                }
            }
        }
        self.metrics.count("accepted", accepted);
        self.metrics.count("not_acknowledged", unknown.len());
        retry.sort_unstable();

        let Rejections { details, count, by_reason, .. } = rejections;
        let mut body = json!({"accepted": accepted, "rejected": details});
        if count > 0 {
            body["rejected_count"] = json!(count);
            body["rejected_by_reason"] = json!(by_reason);
        }
        let kafka_trouble = !unknown.is_empty() || retry.len() > rate_limited.len();
        if !retry.is_empty() {
            body["retry"] = json!(retry);
        }
        if !unknown.is_empty() {
            body["unknown"] = json!(unknown);
        }
        if kafka_trouble {
            body["error"] = json!(format!(
                "Kafka did not acknowledge every record ({}): send the `retry` ones again; the `unknown` ones \
                 timed out and may or may not be in Kafka (resending them is safe with a `ts` and \
                 `--dedup natural-key`)",
                errors.join("; ")
            ));
            return with_retry_after(StatusCode::SERVICE_UNAVAILABLE, body, Duration::from_secs(1));
        }
        if !rate_limited.is_empty() {
            body["error"] = json!("rate limit exceeded: send the `retry` records again after Retry-After");
            return with_retry_after(StatusCode::TOO_MANY_REQUESTS, body, retry_after);
        }
        if count > 0 {
            body["note"] = json!("the valid records of this request were accepted");
            return reply(StatusCode::BAD_REQUEST, body);
        }
        reply(StatusCode::ACCEPTED, body)
    }
}

/// Whether a produce error means the record certainly never reached Kafka (refused by the
/// local producer), as opposed to a timeout after which it may be there.
fn never_sent(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
        )
    )
}

fn with_retry_after(status: StatusCode, body: serde_json::Value, wait: Duration) -> Response {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = reply(status, body);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// `GET /healthz`: 200 when the last periodic metadata request for the topic succeeded.
async fn healthz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.healthy.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable or topic missing\n").into_response()
    }
}

/// `GET /metrics`: Prometheus text format.
async fn prometheus(State(gw): State<Arc<Gateway>>) -> Response {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &gw.metrics.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(body: &'static [u8], max: usize) -> Result<Vec<Result<Bytes, String>>, SplitError> {
        split_json_body(&Bytes::from_static(body), max)
    }

    #[test]
    fn bodies_split_into_records() {
        let one = split(b" {\"serverId\":\"a\",\n \"cpu\":1}\n", 10).unwrap();
        assert_eq!(one.len(), 1);
        let array = split(br#"[{"serverId":"a"}, {"serverId":"b"}, 3]"#, 10).unwrap();
        assert_eq!(
            array.iter().map(|r| r.as_ref().unwrap().as_ref()).collect::<Vec<_>>(),
            vec![&br#"{"serverId":"a"}"#[..], br#"{"serverId":"b"}"#, b"3"]
        );
        let ndjson = split(b"{\"serverId\":\"a\"}\n\n{\"serverId\":\"b\"}\r\n{bad\n", 10).unwrap();
        assert_eq!(ndjson.len(), 3);
        assert_eq!(ndjson[2].as_ref().unwrap().as_ref(), b"{bad");
        assert!(split(b"[1,", 10).unwrap().pop().unwrap().is_err());
    }

    #[test]
    fn record_count_is_capped_while_splitting() {
        assert_eq!(split(b"[1,2,3]", 3).unwrap().len(), 3);
        assert_eq!(split(b"[1,2,3,4]", 3).unwrap_err(), SplitError::TooMany(3));
        assert_eq!(split(b"1\n2\n3\n", 3).unwrap().len(), 3);
        assert_eq!(split(b"1\n2\n3\n4\n", 3).unwrap_err(), SplitError::TooMany(3));
        let huge = Bytes::from("1\n".repeat(2_000_000));
        assert_eq!(split_json_body(&huge, 10_000).unwrap_err(), SplitError::TooMany(10_000));
        assert!(line_protocol_lines_exceed("a\n# c\n\nb\nc\n", 2));
        assert!(!line_protocol_lines_exceed("a\n# c\n\nb\n", 2));
    }

    #[test]
    fn time_is_stamped_on_records_without_one() {
        assert_eq!(
            stamp_time(br#" {"serverId":"a","cpu":1}"#, 42).unwrap().as_ref(),
            br#"{"ts":42,"serverId":"a","cpu":1}"#
        );
        assert_eq!(stamp_time(b"{ }", 42).unwrap().as_ref(), br#"{"ts":42 }"#);
        assert!(stamp_time(b"[1]", 42).is_none());
        let now = now_ms();
        let stamped = stamp_time(br#"{"serverId":"a","cpu":1}"#, now).unwrap();
        let metric = decode(&stamped, None, None, now, &Limits::default()).unwrap();
        assert_eq!(metric.time_us, now * 1000);
    }
}
