//! `fleetflow gateway`: the HTTP front door in front of Kafka.
//!
//! Servers POST metric records; the gateway validates each with the job's own rules
//! (`record::decode`), applies a per-serverId token bucket and a global bound on records in
//! flight, produces the valid ones keyed by serverId (idempotent, acks=all), and answers only
//! once Kafka has acknowledged them. A 202 therefore means "in Kafka"; anything not
//! acknowledged is reported as such and is not in Kafka as far as the gateway knows.

pub mod line_protocol;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::cli::GatewayArgs;
use crate::record::{decode, now_ms, Limits};

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
            "Records by outcome (accepted, rejected, rate_limited, not_acknowledged)",
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
    produce_timeout: Duration,
    metrics: GatewayMetrics,
}

/// Runs the gateway until SIGINT/SIGTERM, then stops accepting, flushes the producer and returns.
pub async fn serve(args: GatewayArgs) -> anyhow::Result<()> {
    let mut config = crate::kafka::client_config(&args.kafka, crate::kafka::producer::PRODUCER_DEFAULTS);
    config
        .set("linger.ms", args.linger_ms.to_string())
        .set("batch.num.messages", args.batch_records.to_string())
        .set("message.timeout.ms", args.produce_timeout.as_millis().to_string());
    for (k, v) in &args.kafka.kafka_options {
        config.set(k, v);
    }
    let producer: FutureProducer = config.create().context("cannot create the Kafka producer")?;
    // Fail at start, in one line, when the broker or the topic is not there.
    let kafka = args.kafka.clone();
    tokio::task::spawn_blocking(move || crate::kafka::admin::partition_count(&kafka)).await??;

    let rate = args.rate_limit.map(|per_second| {
        let burst = NonZeroU32::new(args.rate_burst.max(1)).expect("max(1)");
        let per_second = NonZeroU32::new(per_second.max(1)).expect("max(1)");
        RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
    });
    let gateway = Arc::new(Gateway {
        producer,
        topic: args.kafka.topic.clone(),
        limits: Limits { max_bytes: args.max_record_bytes, max_age: args.max_age, max_future: args.max_future },
        rate,
        in_flight: Arc::new(Semaphore::new(args.max_in_flight)),
        max_in_flight: args.max_in_flight,
        produce_timeout: args.produce_timeout,
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
    let app = Router::new()
        .route("/v1/metrics", post(post_json))
        .route("/api/v2/write", post(post_line_protocol))
        .route("/healthz", get(healthz))
        .route("/metrics", get(prometheus))
        .layer(DefaultBodyLimit::max(args.max_body_bytes))
        .with_state(gateway.clone());

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, topic = %args.kafka.topic, "gateway listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;

    tracing::info!("gateway stopping: flushing the producer");
    let producer = gateway.producer.clone();
    tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(30)))
        .await?
        .context("records were still unacknowledged after 30 s")?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `POST /v1/metrics`: one JSON object, a JSON array of objects, or newline-delimited JSON.
async fn post_json(State(gw): State<Arc<Gateway>>, body: Bytes) -> Response {
    let candidates = split_json_body(&body);
    let response = gw.ingest(candidates).await;
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
    body: Bytes,
) -> Response {
    let response = match std::str::from_utf8(&body) {
        Ok(text) => {
            let records = line_protocol::to_records(text, params.precision);
            gw.ingest(records.into_iter().map(|r| r.map(String::into_bytes).map(Bytes::from)).collect()).await
        }
        Err(_) => (StatusCode::BAD_REQUEST, "body is not valid UTF-8").into_response(),
    };
    gw.metrics
        .requests
        .get_or_create(&RouteLabels { route: "/api/v2/write", status: response.status().as_u16() })
        .inc();
    response
}

/// Splits a body into the raw bytes of each record (or why a part is unusable).
pub fn split_json_body(body: &Bytes) -> Vec<Result<Bytes, String>> {
    let text = body.trim_ascii();
    if text.first() == Some(&b'[') {
        return match serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(text) {
            Ok(items) => items.iter().map(|raw| Ok(Bytes::copy_from_slice(raw.get().as_bytes()))).collect(),
            Err(e) => vec![Err(format!("malformed JSON array: {e}"))],
        };
    }
    // One object (possibly spread over several lines) ...
    if serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok() {
        return vec![Ok(body.slice_ref(text))];
    }
    // ... or newline-delimited JSON.
    text.split(|b| *b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|line| !line.is_empty())
        .map(|line| Ok(body.slice_ref(line)))
        .collect()
}

impl Gateway {
    async fn ingest(&self, candidates: Vec<Result<Bytes, String>>) -> Response {
        let now = now_ms();
        let mut rejected = Vec::new();
        let mut rate_limited = 0usize;
        let mut retry_after = Duration::ZERO;
        let mut valid: Vec<(String, Bytes)> = Vec::new();
        for (index, candidate) in candidates.into_iter().enumerate() {
            let raw = match candidate {
                Ok(raw) => raw,
                Err(reason) => {
                    self.metrics.rejections.get_or_create(&ReasonLabels { reason: "malformed_json" }).inc();
                    rejected.push(json!({"index": index, "reason": reason}));
                    continue;
                }
            };
            match decode(&raw, None, Some(now), now, &self.limits) {
                Ok(metric) => {
                    if let Some(limiter) = &self.rate {
                        if let Err(wait) = limiter.check_key(&metric.server_id) {
                            let wait = wait
                                .wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
                            retry_after = retry_after.max(wait);
                            rate_limited += 1;
                            self.metrics.rejections.get_or_create(&ReasonLabels { reason: "rate_limited" }).inc();
                            rejected.push(json!({"index": index, "reason": format!("rate limit exceeded for serverId {:?}", metric.server_id)}));
                            continue;
                        }
                    }
                    valid.push((metric.server_id, raw));
                }
                Err(e) => {
                    self.metrics.rejections.get_or_create(&ReasonLabels { reason: e.kind() }).inc();
                    rejected.push(json!({"index": index, "reason": e.to_string()}));
                }
            }
        }
        self.metrics.count("rejected", rejected.len() - rate_limited);
        self.metrics.count("rate_limited", rate_limited);

        // Bounded memory: refuse rather than queue without limit when Kafka is slow.
        let permits = match self.in_flight.clone().try_acquire_many_owned(valid.len() as u32) {
            Ok(p) => p,
            Err(_) => {
                self.metrics.count("overloaded", valid.len());
                let body = json!({"accepted": 0, "error": format!("overloaded: more than {} records waiting for Kafka; retry later", self.max_in_flight)});
                return with_retry_after(StatusCode::SERVICE_UNAVAILABLE, body, Duration::from_secs(1));
            }
        };
        self.metrics.in_flight.inc_by(valid.len() as i64);
        let started = Instant::now();
        let sends = valid.iter().map(|(key, payload)| {
            let record = FutureRecord::to(&self.topic).key(key.as_str()).payload(payload.as_ref());
            self.producer.send(record, self.produce_timeout)
        });
        let results = futures_util::future::join_all(sends).await;
        self.metrics.in_flight.dec_by(valid.len() as i64);
        drop(permits);
        if !valid.is_empty() {
            self.metrics.produce_latency.observe(started.elapsed().as_secs_f64());
        }
        let failed: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|(e, _)| e.to_string())).collect();
        let accepted = valid.len() - failed.len();
        self.metrics.count("accepted", accepted);
        self.metrics.count("not_acknowledged", failed.len());

        let mut body = json!({"accepted": accepted, "rejected": rejected});
        if !failed.is_empty() {
            body["not_acknowledged"] = json!(failed.len());
            body["error"] = json!(format!(
                "Kafka did not acknowledge {} record(s) ({}); they were not stored, retry them",
                failed.len(),
                failed[0]
            ));
            return with_retry_after(StatusCode::SERVICE_UNAVAILABLE, body, Duration::from_secs(1));
        }
        if rate_limited > 0 {
            return with_retry_after(StatusCode::TOO_MANY_REQUESTS, body, retry_after);
        }
        if body["rejected"].as_array().is_some_and(|r| !r.is_empty()) {
            body["note"] = json!("the valid records of this request were accepted");
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
        (StatusCode::ACCEPTED, axum::Json(body)).into_response()
    }
}

fn with_retry_after(status: StatusCode, body: serde_json::Value, wait: Duration) -> Response {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// `GET /healthz`: 200 when the broker answers a metadata request for the topic.
async fn healthz(State(gw): State<Arc<Gateway>>) -> Response {
    let producer = gw.producer.clone();
    let topic = gw.topic.clone();
    let ok = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(2))
            .is_ok_and(|m| m.topics().iter().any(|t| t.name() == topic && t.error().is_none()))
    })
    .await
    .unwrap_or(false);
    if ok {
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

    #[test]
    fn bodies_split_into_records() {
        let one = split_json_body(&Bytes::from_static(b" {\"serverId\":\"a\",\n \"cpu\":1}\n"));
        assert_eq!(one.len(), 1);
        let array = split_json_body(&Bytes::from_static(br#"[{"serverId":"a"}, {"serverId":"b"}, 3]"#));
        assert_eq!(
            array.iter().map(|r| r.as_ref().unwrap().as_ref()).collect::<Vec<_>>(),
            vec![&br#"{"serverId":"a"}"#[..], br#"{"serverId":"b"}"#, b"3"]
        );
        let ndjson = split_json_body(&Bytes::from_static(b"{\"serverId\":\"a\"}\n\n{\"serverId\":\"b\"}\r\n{bad\n"));
        assert_eq!(ndjson.len(), 3);
        assert_eq!(ndjson[2].as_ref().unwrap().as_ref(), b"{bad");
        assert!(split_json_body(&Bytes::from_static(b"[1,")).pop().unwrap().is_err());
    }
}
