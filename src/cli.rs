//! The command line: every flag, its environment variable, its default.
//!
//! Flags win over environment variables (`FLEETFLOW_*`), which win over the defaults. The
//! doc comments here are the reference: `fleetflow <command> --help` prints them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "fleetflow", version, about = "Server metrics from Kafka into TimescaleDB, exactly once")]
pub struct Cli {
    /// A TOML file whose keys mirror the flags (see README); flags and FLEETFLOW_* variables win.
    #[arg(long, global = true, env = "FLEETFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the ingest job: Kafka partitions -> timely workers -> TimescaleDB.
    Run(RunArgs),
    /// Produce simulated fleet metrics to Kafka.
    Loadgen(LoadgenArgs),
    /// Manage the Kafka topic.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Create or upgrade the database schema, then exit.
    Migrate(DatabaseArgs),
    /// HTTP ingest gateway in front of Kafka.
    Gateway(GatewayArgs),
    /// Measure the job against the Kafka and database ceilings (prints a table, writes JSON).
    Bench(BenchArgs),
    /// Committed offsets, lag per partition, last commit, dead letters: one readable table.
    Status(StatusArgs),
    /// Validate the configuration and reach the broker and the database; say what is wrong.
    Check(RunArgs),
    /// Drop raw data older than a duration (TimescaleDB drop_chunks).
    Retention(RetentionArgs),
    /// Ask the rollups: hottest servers, a server's series, the fleet, silent servers.
    Query(QueryArgs),
}

#[derive(Args, Debug, Clone)]
pub struct QueryArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    #[command(subcommand)]
    pub command: QueryCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricName {
    Cpu,
    Ram,
}

impl MetricName {
    /// The column prefix in the rollup tables.
    pub fn column(self) -> &'static str {
        match self {
            MetricName::Cpu => "cpu",
            MetricName::Ram => "ram",
        }
    }
}

#[derive(Subcommand, Debug, Clone)]
pub enum QueryCommand {
    /// Hottest servers by average over a window.
    Top {
        #[arg(long, value_enum, default_value_t = MetricName::Cpu)]
        metric: MetricName,
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        window: Duration,
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// One server's per-minute series.
    Server {
        server_id: String,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        since: Duration,
    },
    /// Fleet-wide per-minute statistics.
    Fleet {
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        since: Duration,
    },
    /// Servers that reported in the last hour but went quiet (run --silent-after), and since when.
    Silent,
    /// The alerts of the [[alert]] rules, newest first.
    Alerts {
        /// Only the alerts that are firing now.
        #[arg(long)]
        active: bool,
        /// Alerts that started or ended within this window (ignored with --active).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        since: Duration,
    },
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RetentionArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Drop chunks of `metrics` whose data is all older than this (e.g. 30d).
    #[arg(long, value_parser = parse_duration)]
    pub older_than: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Brokers, and the prefix of the fresh topics the benchmark creates.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// A database on the server where the benchmark creates its fresh databases.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Records in the pre-loaded topic.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Simulated servers.
    #[arg(long, default_value_t = 5000)]
    pub servers: u32,
    /// Job shapes to run, PROCESSESxWORKERS.
    #[arg(long, value_delimiter = ',', default_value = "1x1,1x2,2x2")]
    pub shapes: Vec<String>,
    /// Also run 2x2 with --dedup natural-key and with --rollups false, for their costs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub dedup_run: bool,
    /// Parallel connections of the database-ceiling COPY.
    #[arg(long, default_value_t = 2)]
    pub db_connections: usize,
    /// Length of the steady-state latency run, in seconds (0 skips it).
    #[arg(long, default_value_t = 20)]
    pub latency_seconds: u64,
    /// Steady-state produce rate, as a fraction of the best job rate.
    #[arg(long, default_value_t = 0.5)]
    pub steady_fraction: f64,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-results.json")]
    pub output: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Address to listen on.
    #[arg(long, env = "FLEETFLOW_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, env = "FLEETFLOW_GATEWAY_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest single record, in bytes (the job's --max-message-bytes).
    #[arg(long, env = "FLEETFLOW_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_record_bytes: usize,
    /// Records per second each serverId may send (token bucket; default: no limit).
    #[arg(long, env = "FLEETFLOW_GATEWAY_RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    /// Bucket size of the per-serverId limit: records a server may send at once.
    #[arg(long, env = "FLEETFLOW_GATEWAY_RATE_BURST", default_value_t = 10)]
    pub rate_burst: u32,
    /// Records produced but not yet acknowledged by Kafka, at most. A request waits for room
    /// (up to --produce-timeout, then 503); one with more valid records than this is a 413.
    #[arg(long, env = "FLEETFLOW_GATEWAY_MAX_IN_FLIGHT", default_value_t = 100_000)]
    pub max_in_flight: usize,
    /// Records (JSON items or lines) one request may hold (413 beyond, naming the limit).
    #[arg(long, env = "FLEETFLOW_GATEWAY_MAX_RECORDS", default_value_t = 10_000)]
    pub max_records: usize,
    /// Largest body after gzip decompression, in bytes (413 beyond).
    #[arg(long, env = "FLEETFLOW_GATEWAY_MAX_DECOMPRESSED_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_decompressed_bytes: usize,
    /// Rejection reasons a reply lists one by one (the rest are counted by reason).
    #[arg(long, env = "FLEETFLOW_GATEWAY_MAX_REJECTION_DETAILS", default_value_t = 100)]
    pub max_rejection_details: usize,
    /// Open connections at most (HTTP/1.1: also requests at once); more wait in the kernel's backlog.
    #[arg(long, env = "FLEETFLOW_GATEWAY_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Time a client has to send the request headers (and to finish the TLS handshake); also
    /// how long an idle keep-alive connection is kept.
    #[arg(long, env = "FLEETFLOW_GATEWAY_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// Time a client has to send the whole request body (408 beyond).
    #[arg(long, env = "FLEETFLOW_GATEWAY_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// On SIGTERM, how long open requests may take before their connections are dropped.
    #[arg(long, env = "FLEETFLOW_GATEWAY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// How often /healthz's cached broker check runs.
    #[arg(long, env = "FLEETFLOW_GATEWAY_HEALTH_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Accepted bearer tokens, comma separated; each `TOKEN` or `TOKEN PREFIX` (then only
    /// serverIds starting with PREFIX). None here and no --tokens-file: no authentication.
    #[arg(long, env = "FLEETFLOW_GATEWAY_TOKENS", value_delimiter = ',', hide_env_values = true)]
    pub tokens: Vec<String>,
    /// File of accepted tokens, one `TOKEN [PREFIX]` a line (`#` comments).
    #[arg(long, env = "FLEETFLOW_GATEWAY_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key, the gateway speaks HTTPS only.
    #[arg(long, env = "FLEETFLOW_GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "FLEETFLOW_GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How long a record may wait for Kafka's acknowledgement before the request fails.
    #[arg(long, env = "FLEETFLOW_GATEWAY_PRODUCE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub produce_timeout: Duration,
    /// Producer batching: linger.ms.
    #[arg(long, env = "FLEETFLOW_GATEWAY_LINGER_MS", default_value_t = 5)]
    pub linger_ms: u32,
    /// Producer batching: batch.num.messages.
    #[arg(long, env = "FLEETFLOW_GATEWAY_BATCH_RECORDS", default_value_t = 10_000)]
    pub batch_records: u32,
    /// Oldest accepted record timestamp, relative to now.
    #[arg(long, env = "FLEETFLOW_MAX_AGE", default_value = "365days", value_parser = parse_duration)]
    pub max_age: Duration,
    /// Furthest accepted record timestamp into the future, relative to now.
    #[arg(long, env = "FLEETFLOW_MAX_FUTURE", default_value = "10m", value_parser = parse_duration)]
    pub max_future: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port, comma separated).
    #[arg(long, env = "FLEETFLOW_BROKERS", default_value = "127.0.0.1:59092")]
    pub brokers: String,
    /// The topic carrying metric reports.
    #[arg(long, env = "FLEETFLOW_TOPIC", default_value = "metrics")]
    pub topic: String,
    /// Extra librdkafka settings, passed through as is (repeatable): -X security.protocol=ssl
    #[arg(short = 'X', long = "kafka", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub kafka_options: Vec<(String, String)>,
}

#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL connection string of a database with the timescaledb extension available.
    /// TLS options go in the string (sslmode=...).
    // Global, so `fleetflow query top --database-url ...` works as well as before `top`.
    #[arg(
        long,
        global = true,
        env = "FLEETFLOW_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:55432/postgres"
    )]
    pub database_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StartFrom {
    /// The oldest message still in the partition.
    Earliest,
    /// Only messages produced after the first start.
    Latest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnTopicReset {
    /// Stop with a line naming the partitions and offsets.
    Refuse,
    /// Forget the topic's committed offsets and watermarks; read it from the earliest offset.
    StartOver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dedup {
    /// Exactly-once per Kafka message (watermarks); no unique index.
    None,
    /// Also one row per (serverId, time), whatever the producer sent.
    NaturalKey,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Kafka consumer group the committed offsets are mirrored to (for lag tools).
    #[arg(long, env = "FLEETFLOW_GROUP", default_value = "fleetflow")]
    pub group: String,
    /// Worker threads in this process.
    #[arg(long, short = 'w', env = "FLEETFLOW_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Number of processes in the job.
    #[arg(long, short = 'n', env = "FLEETFLOW_PROCESSES", default_value_t = 1)]
    pub processes: usize,
    /// This process's index, 0-based, below --processes.
    #[arg(long, short = 'p', env = "FLEETFLOW_PROCESS_ID", default_value_t = 0)]
    pub process_id: usize,
    /// host:port of every process, in process-id order (comma separated).
    #[arg(long, env = "FLEETFLOW_HOSTS", value_delimiter = ',', conflicts_with = "hostfile")]
    pub hosts: Vec<String>,
    /// A file with one host:port per line, in process-id order (blank lines and # comments ignored).
    #[arg(long, env = "FLEETFLOW_HOSTFILE")]
    pub hostfile: Option<PathBuf>,
    /// Where a partition with no committed offset starts, on the first run.
    #[arg(long, env = "FLEETFLOW_START", value_enum, default_value_t = StartFrom::Earliest)]
    pub start: StartFrom,
    /// Records a source worker puts in one epoch before it starts the next.
    #[arg(long, env = "FLEETFLOW_EPOCH_RECORDS", default_value_t = 1000)]
    pub epoch_records: usize,
    /// Bytes (of decoded records in memory) a source worker puts in one epoch at most.
    #[arg(long, env = "FLEETFLOW_EPOCH_BYTES", default_value_t = 4 << 20)]
    pub epoch_bytes: usize,
    /// Bytes of records a process holds that are read but not yet durable, at most (split
    /// between its source workers): with large messages this, not the epoch count, is what
    /// bounds memory. librdkafka's prefetch adds its own bounded queue per worker.
    #[arg(long, env = "FLEETFLOW_MAX_BYTES_IN_FLIGHT", default_value_t = RunArgs::default_max_bytes_in_flight())]
    pub max_bytes_in_flight: usize,
    /// Longest time an epoch with records stays open.
    #[arg(long, env = "FLEETFLOW_EPOCH_INTERVAL", default_value = "100ms", value_parser = parse_duration)]
    pub epoch_interval: Duration,
    /// Closed epochs a source worker may hold that are not yet durable; with
    /// --epoch-records this bounds the records it buffers (backpressure).
    #[arg(long, env = "FLEETFLOW_MAX_EPOCHS_IN_FLIGHT", default_value_t = 64)]
    pub max_epochs_in_flight: u64,
    /// Most rows in one binary COPY batch.
    #[arg(long, env = "FLEETFLOW_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: usize,
    /// Database connections per sink worker [default: 2 for a job of one worker, else 1].
    /// A worker's key groups are split between them, each with its own transactions (and
    /// exactly-once watermarks), so the database works on one part while the worker
    /// prepares the next. More connections in all than the database has cores slow it down.
    #[arg(long, env = "FLEETFLOW_SINK_CONNECTIONS")]
    pub sink_connections: Option<usize>,
    /// How often durable offsets are committed (database table and consumer group).
    #[arg(long, env = "FLEETFLOW_COMMIT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub commit_interval: Duration,
    /// Exit once every partition has been at its end this long and everything is committed.
    #[arg(long, env = "FLEETFLOW_EXIT_WHEN_IDLE", value_parser = parse_duration)]
    pub exit_when_idle: Option<Duration>,
    /// How often the one-line progress report is printed (and --summary-json rewritten).
    #[arg(long, env = "FLEETFLOW_REPORT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub report_interval: Duration,
    /// Write this process's run summary to FILE as JSON (what the "job finished" line says):
    /// at start, at every --report-interval ("finished": false) and at exit ("finished":
    /// true, with the exit code). Each write replaces the file atomically.
    #[arg(long, env = "FLEETFLOW_SUMMARY_JSON", value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
    /// With several processes: how long to wait at start for the other processes of the job
    /// to connect before giving up with an error (0s waits forever).
    #[arg(long, env = "FLEETFLOW_CONNECT_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// After SIGINT/SIGTERM, how long to wait for open epochs to become durable before
    /// abandoning them (they are re-read on the next start; nothing is lost).
    #[arg(long, env = "FLEETFLOW_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Largest accepted message, in bytes; larger ones are dead-lettered.
    #[arg(long, env = "FLEETFLOW_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,
    /// Oldest accepted record timestamp, relative to now.
    #[arg(long, env = "FLEETFLOW_MAX_AGE", default_value = "365days", value_parser = parse_duration)]
    pub max_age: Duration,
    /// Furthest accepted record timestamp into the future, relative to now.
    #[arg(long, env = "FLEETFLOW_MAX_FUTURE", default_value = "10m", value_parser = parse_duration)]
    pub max_future: Duration,
    /// Duplicate handling beyond exactly-once delivery: `natural-key` also drops a record
    /// whose (serverId, time) is already stored (a producer that sent the same report
    /// twice). It adds a unique index on metrics (server_id, time) and costs ingest speed.
    #[arg(long, env = "FLEETFLOW_DEDUP", value_enum, default_value_t = Dedup::None)]
    pub dedup: Dedup,
    /// Maintain the per-minute rollups (metrics_1m, fleet_1m, silent_servers) in the same
    /// transactions as the raw rows. `--rollups false` writes raw rows only.
    #[arg(long, env = "FLEETFLOW_ROLLUPS", default_value_t = true, action = clap::ArgAction::Set)]
    pub rollups: bool,
    /// A server that reported in the last hour but not for this long is listed in silent_servers.
    #[arg(long, env = "FLEETFLOW_SILENT_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub silent_after: Duration,
    /// Serve Prometheus `/metrics` and `/healthz` on this address (e.g. 127.0.0.1:9898).
    #[arg(long, env = "FLEETFLOW_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Send the alerts of the config file's [[alert]] rules to this Prometheus Alertmanager
    /// (its v2 API), e.g. http://127.0.0.1:9093.
    #[arg(long, env = "FLEETFLOW_ALERTMANAGER_URL")]
    pub alertmanager_url: Option<String>,
    /// How often firing (and recently resolved) alerts are sent to Alertmanager again.
    #[arg(long, env = "FLEETFLOW_ALERT_RESEND_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub alert_resend_interval: Duration,
    /// How far behind a server's newest minute a late report may still change an alert
    /// (each server keeps its newest minutes: the longest rule's `for` plus this).
    #[arg(long, env = "FLEETFLOW_ALERT_LATENESS", default_value = "10m", value_parser = parse_duration)]
    pub alert_lateness: Duration,
    /// The config file's [[alert]] rules (set from --config, not a flag).
    #[arg(skip)]
    pub alert_rules: crate::alerts::rules::AlertRules,
    /// Drop raw chunks older than this, checked hourly by process 0 (default: keep all).
    #[arg(long, env = "FLEETFLOW_RETAIN", value_parser = parse_duration)]
    pub retain: Option<Duration>,
    /// Record, per written batch, which worker wrote which serverIds (table
    /// fleetflow_audit). Costs a little; meant for tests and investigations.
    #[arg(long, env = "FLEETFLOW_AUDIT")]
    pub audit: bool,
    /// A database call of a write (a statement, the commit) or an offset commit that takes
    /// longer means the database (or the session) hung: the write is abandoned and retried on
    /// a new connection, and /healthz says so.
    #[arg(long, env = "FLEETFLOW_DATABASE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub database_timeout: Duration,
    /// Take the topic from another job that still holds it (one frozen or cut off from its
    /// peers): its database sessions are ended and its later writes refused. Without this a
    /// second copy of the job refuses to start.
    #[arg(long, env = "FLEETFLOW_TAKE_OVER")]
    pub take_over: bool,
    /// A partition with messages to read that delivers none (a batch that cannot be decoded,
    /// an authorization error, a broker that does not serve it) is reported as stalled after
    /// a quarter of this (at most 30 s), and after this the job stops with one line naming
    /// it and the last Kafka error. 0s: report, never stop. Time spent held back by
    /// backpressure does not count.
    #[arg(long, env = "FLEETFLOW_STALL_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub stall_timeout: Duration,
    /// What to do when the committed offsets do not fit the topic (it was deleted and
    /// recreated, or truncated: a committed offset beyond a partition's end). `refuse`
    /// stops with a line naming the partitions; `start-over` forgets the topic's offsets and
    /// exactly-once watermarks and reads it again from the earliest offset (the rows already
    /// written stay).
    #[arg(long, env = "FLEETFLOW_ON_TOPIC_RESET", value_enum, default_value_t = OnTopicReset::Refuse)]
    pub on_topic_reset: OnTopicReset,
    /// How often each worker asks the broker for the topic's partition count: partitions
    /// added to the topic are read from their earliest offset without a restart.
    #[arg(long, env = "FLEETFLOW_METADATA_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub metadata_interval: Duration,
}

impl RunArgs {
    /// The default of `--max-bytes-in-flight` (the benchmark computes a memory bound from it).
    pub const fn default_max_bytes_in_flight() -> usize {
        64 << 20
    }
}

#[derive(Args, Debug, Clone)]
pub struct LoadgenArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Number of simulated servers (serverIds s1..sN).
    #[arg(long, env = "FLEETFLOW_LOADGEN_SERVERS", default_value_t = 5000)]
    pub servers: u32,
    /// Reporting interval of each server (spacing of the records' timestamps).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Total records to produce (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
    /// Target records per second (default: as fast as possible with --count, or the real
    /// cadence servers/interval without it).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seed for the simulated values: the same seed gives the same records.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Timestamp of the first round, RFC 3339 (default: now minus count/servers intervals,
    /// so a burst lands in the recent past).
    #[arg(long)]
    pub start_time: Option<String>,
    /// Fraction of records replaced by malformed ones (exercises the dead-letter path).
    #[arg(long, default_value_t = 0.0)]
    pub bad_fraction: f64,
    /// Send to the gateway at this URL (e.g. http://127.0.0.1:8080) instead of straight to Kafka.
    #[arg(long, env = "FLEETFLOW_GATEWAY_URL")]
    pub gateway: Option<String>,
    /// Bearer token for a gateway that requires one.
    #[arg(long, env = "FLEETFLOW_GATEWAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Records per HTTP request when sending to the gateway.
    #[arg(long, default_value_t = 500)]
    pub http_batch: usize,
    /// Concurrent HTTP requests when sending to the gateway.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Fraction of records sent a second time, as a retrying producer would (exercises
    /// `run --dedup natural-key`).
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_fraction: f64,
}

#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Create the topic (no error if it exists with the same partition count).
    Create {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        #[arg(long, default_value_t = 1)]
        replication: i32,
    },
}

/// Parses "30s", "100ms", "1h 5m", "7days".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 5m, 2h, 7days)"))
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_flags_parse_with_defaults() {
        let cli = Cli::try_parse_from(["fleetflow", "run", "-w", "2", "--exit-when-idle", "2s"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("not run") };
        assert_eq!(run.workers, 2);
        assert_eq!(run.exit_when_idle, Some(Duration::from_secs(2)));
        assert_eq!(run.kafka.topic, "metrics");
        assert_eq!(run.epoch_records, 1000);
        assert_eq!(run.stall_timeout, Duration::from_secs(120));
        assert_eq!(run.on_topic_reset, OnTopicReset::Refuse);
        assert_eq!(run.metadata_interval, Duration::from_secs(10));
        assert_eq!(run.summary_json, None);
    }

    #[test]
    fn topic_reset_policy_parses() {
        let cli = Cli::try_parse_from(["fleetflow", "run", "--on-topic-reset", "start-over"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("not run") };
        assert_eq!(run.on_topic_reset, OnTopicReset::StartOver);
        assert!(Cli::try_parse_from(["fleetflow", "run", "--on-topic-reset", "ignore"]).is_err());
    }

    #[test]
    fn bad_duration_is_a_clear_error() {
        let err = Cli::try_parse_from(["fleetflow", "run", "--epoch-interval", "soon"]).unwrap_err();
        assert!(err.to_string().contains("examples: 500ms"), "{err}");
    }

    #[test]
    fn kafka_passthrough_needs_key_value() {
        assert!(Cli::try_parse_from(["fleetflow", "run", "-X", "nonsense"]).is_err());
        let cli = Cli::try_parse_from(["fleetflow", "run", "-X", "fetch.max.bytes=1000"]).unwrap();
        let Command::Run(run) = cli.command else { panic!() };
        assert_eq!(run.kafka.kafka_options, vec![("fetch.max.bytes".into(), "1000".into())]);
    }
}
