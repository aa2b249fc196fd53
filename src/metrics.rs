//! The job's Prometheus endpoint: `GET /metrics` and `GET /healthz` on `--metrics-listen`.
//!
//! Counters live in [`Stats`] as plain atomics (bumped on hot paths); a collector reads
//! them at scrape time. Labelled series (dead letters by reason, lag per partition) and the
//! COPY latency histogram are prometheus-client metrics held in `Stats`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::stats::Stats;

/// Reads the atomic counters of [`Stats`] at scrape time.
#[derive(Debug)]
struct StatsCollector(Arc<Stats>);

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let counters: [(&str, &str, u64); 10] = [
            ("records_read", "Messages taken from Kafka", Stats::get(&s.records_read)),
            ("rows_written", "Metric rows committed to TimescaleDB", Stats::get(&s.rows_written)),
            ("dead_letters_written", "Dead letters committed to TimescaleDB", Stats::get(&s.dead_letters_written)),
            (
                "replayed_skipped",
                "Replayed messages dropped by the exactly-once watermarks",
                Stats::get(&s.replayed_skipped),
            ),
            (
                "rejected_by_database",
                "Records that passed validation but the database refused (dead-lettered with its reason)",
                Stats::get(&s.rejected_by_database),
            ),
            ("natural_key_duplicates", "Rows dropped by --dedup natural-key", Stats::get(&s.natural_key_duplicates)),
            ("transactions", "Write transactions (batches of epochs) committed", Stats::get(&s.transactions)),
            ("offset_commits", "Offset commits stored in the database", Stats::get(&s.offset_commits)),
            ("epochs_durable", "Epochs that became durable everywhere", Stats::get(&s.epochs_durable)),
            (
                "database_errors",
                "Database errors met by writers and committers (each retried)",
                Stats::get(&s.database_errors),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let durable = Stats::get(&s.durable_epoch) as i64;
        let newest = Stats::get(&s.newest_epoch) as i64;
        let gauges: [(&str, &str, i64); 6] = [
            ("durable_epoch", "Highest epoch durable everywhere (microseconds since the Unix epoch)", durable),
            (
                "newest_epoch",
                "Highest epoch a source of this process has opened (microseconds since the Unix epoch)",
                newest,
            ),
            ("consumer_lag", "Messages behind the partition ends, this process's partitions", s.lag.load(Relaxed)),
            ("backpressured", "1 while a source waits for the database to catch up", s.backpressured.any() as i64),
            (
                "database_waiting",
                "1 while a writer waits for the database to come back",
                s.database_waiting.any() as i64,
            ),
            (
                "database_not_answering",
                "1 while a writer's database session has stopped answering (--database-timeout)",
                s.database_not_answering.any() as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        // Epochs are stamped with the clock, so their distance is a time. Before the first
        // epoch closes the durable one is 0: no distance yet.
        let behind = if durable > 0 { (newest - durable).max(0) as f64 / 1e6 } else { 0.0 };
        let gauge = ConstGauge::new(behind);
        gauge.encode(encoder.encode_descriptor(
            "frontier_lag_seconds",
            "How far the durable frontier is behind the newest open epoch, in seconds",
            None,
            gauge.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The registry of one job process.
pub fn registry(stats: &Arc<Stats>) -> Registry {
    let mut registry = Registry::with_prefix("fleetflow");
    registry.register_collector(Box::new(StatsCollector(stats.clone())));
    registry.register("dead_letters", "Messages that failed decoding, by reason", stats.dead_letters_by_reason.clone());
    registry.register("partition_lag", "Messages behind the end of each partition", stats.partition_lag.clone());
    registry.register(
        "partition_stalls",
        "Times a partition was found stalled: messages to read, none delivered (see --stall-timeout)",
        stats.partition_stalls.clone(),
    );
    registry.register("partition_stalled", "1 while a partition is stalled", stats.partition_stalled.clone());
    registry.register(
        "skipped_offsets",
        "Offsets deleted by retention before the job read them, per partition",
        stats.skipped_offsets.clone(),
    );
    registry.register(
        "copy_seconds",
        "Duration of write transactions (COPY + bookkeeping + commit)",
        stats.copy_seconds.clone(),
    );
    registry
}

struct Endpoint {
    registry: Registry,
    stats: Arc<Stats>,
}

/// Serves `/metrics` and `/healthz` on `listen` until the process exits.
pub async fn serve(listen: &str, stats: Arc<Stats>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-listen {listen}: {e}"))?;
    tracing::info!(listen = %listener.local_addr()?, "metrics endpoint listening");
    let state = Arc::new(Endpoint { registry: registry(&stats), stats });
    let app = Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}

async fn metrics(State(endpoint): State<Arc<Endpoint>>) -> Response {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &endpoint.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

/// 200 while the job can write; 503 while it waits for the database (down, or not
/// answering within `--database-timeout`) or a partition is stalled.
async fn healthz(State(endpoint): State<Arc<Endpoint>>) -> Response {
    let s = &endpoint.stats;
    // Partitions that have messages to read and deliver none (kafka::watch), with the reason.
    let stalled: Vec<serde_json::Value> = s
        .stalled
        .lock()
        .map(|m| m.iter().map(|(p, why)| serde_json::json!({"partition": p, "reason": why})).collect())
        .unwrap_or_default();
    let body = serde_json::json!({
        "database_waiting": s.database_waiting.any(),
        "database_not_answering": s.database_not_answering.any(),
        "backpressured": s.backpressured.any(),
        "durable_epoch": Stats::get(&s.durable_epoch),
        "rows_written": Stats::get(&s.rows_written),
        "stalled_partitions": stalled,
    });
    let status =
        if s.database_waiting.any() || !stalled.is_empty() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, axum::Json(body)).into_response()
}
