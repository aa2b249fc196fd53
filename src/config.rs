//! The typed configuration, built once from flags, environment and the `--config` file
//! (precedence in that order) and validated here: [`JobConfig`] for `fleetflow run` (and
//! `check`), [`KafkaConfig`] and [`DatabaseConfig`] for every command that talks to Kafka
//! or the database. The library takes these, never the clap structs of `cli`. Every error
//! names the flag to fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{DatabaseArgs, KafkaArgs, RunArgs};
use crate::record::Limits;

pub use crate::cli::{Dedup, OnTopicReset, StartFrom};

/// Where Kafka is and how to talk to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap servers, host:port, comma separated.
    pub brokers: String,
    pub topic: String,
    /// librdkafka settings passed through: the config file's `[kafka]` table, then `-X`.
    pub options: Vec<(String, String)>,
}

impl KafkaConfig {
    /// Brokers and topic with librdkafka's defaults.
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        KafkaConfig { brokers: brokers.into(), topic: topic.into(), options: Vec::new() }
    }
}

impl From<KafkaArgs> for KafkaConfig {
    fn from(args: KafkaArgs) -> Self {
        KafkaConfig { brokers: args.brokers, topic: args.topic, options: args.kafka_options }
    }
}

/// The database: a PostgreSQL connection string (TLS options in it) of a database with the
/// timescaledb extension available.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseConfig {
    pub url: String,
}

impl From<DatabaseArgs> for DatabaseConfig {
    fn from(args: DatabaseArgs) -> Self {
        DatabaseConfig { url: args.database_url }
    }
}

/// Who the processes of the job are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Worker threads per process.
    pub workers: usize,
    pub processes: usize,
    pub process_id: usize,
    /// host:port of every process, in process-id order (empty for a single process).
    pub addresses: Vec<String>,
    /// How long to wait at start for the other processes (zero: for ever).
    pub connect_timeout: Duration,
}

impl Cluster {
    /// timely's configuration for this process.
    pub fn timely(&self) -> timely::Config {
        let communication = if self.processes == 1 {
            timely::CommunicationConfig::Process(self.workers)
        } else {
            timely::CommunicationConfig::Cluster {
                threads: self.workers,
                process: self.process_id,
                addresses: self.addresses.clone(),
                report: false,
                zerocopy: false,
            }
        };
        timely::Config { communication, worker: timely::WorkerConfig::default() }
    }
}

/// How sources cut epochs and how far they may run ahead of what is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Epochs {
    pub records: usize,
    pub bytes: usize,
    pub interval: Duration,
    pub max_in_flight: u64,
    /// Per process, split between its workers.
    pub max_bytes_in_flight: usize,
}

/// How rows are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkConfig {
    pub batch_size: usize,
    /// Database connections per sink worker (`None`: 2 for a job of one worker, else 1).
    pub connections: Option<usize>,
    pub dedup: Dedup,
    pub rollups: bool,
    /// Record which worker wrote which serverIds (`fleetflow_audit`).
    pub audit: bool,
    /// A database call that takes longer means the database or the session hung.
    pub timeout: Duration,
    /// A server quiet for this long is listed in `silent_servers`.
    pub silent_after: Duration,
    /// Drop raw chunks older than this (process 0, hourly).
    pub retain: Option<Duration>,
}

/// The topic under the job: where to start, what to do when it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    /// Where a partition with no committed offset starts, on the first run.
    pub start: StartFrom,
    pub on_reset: OnTopicReset,
    /// Take the topic from another job that still holds it.
    pub take_over: bool,
    /// A partition with messages that delivers none for this long stops the job (zero: never).
    pub stall_timeout: Duration,
    /// How often the partition count is checked.
    pub metadata_interval: Duration,
}

/// The longest `--alert-lateness`.
pub const MAX_ALERT_LATENESS: Duration = Duration::from_secs(3600);
/// The longest `--alert-resend-interval`.
pub const MAX_ALERT_RESEND_INTERVAL: Duration = Duration::from_secs(3600);

/// `fleetflow run`, checked: everything a process of the job needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct JobConfig {
    pub kafka: KafkaConfig,
    pub database: DatabaseConfig,
    /// Consumer group the committed offsets are mirrored to (for lag tools).
    pub group: String,
    pub cluster: Cluster,
    pub topic: TopicConfig,
    pub epochs: Epochs,
    pub sink: SinkConfig,
    /// What a record must satisfy.
    pub limits: Limits,
    /// At most one offset commit per interval.
    pub commit_interval: Duration,
    /// Exit once everything is read, durable and committed and has stayed so this long.
    pub exit_when_idle: Option<Duration>,
    /// How often the progress line (and the running summary) is written.
    pub report_interval: Duration,
    /// After a shutdown signal, how long open epochs may take to become durable.
    pub shutdown_timeout: Duration,
    /// Serve Prometheus `/metrics` and `/healthz` here.
    pub metrics_listen: Option<String>,
    /// Write the run summary (JSON) here, at every report and at exit.
    pub summary_json: Option<PathBuf>,
    /// The alert rules and where their alerts go.
    pub alerts: crate::alerts::AlertConfig,
}

impl JobConfig {
    /// Checks the flags of `fleetflow run` and builds the configuration from them.
    pub fn from_args(args: RunArgs) -> Result<JobConfig, ConfigError> {
        if args.workers == 0 {
            return Err(ConfigError::NoWorkers);
        }
        if args.processes == 0 {
            return Err(ConfigError::NoProcesses);
        }
        if args.process_id >= args.processes {
            return Err(ConfigError::ProcessIdOutOfRange { id: args.process_id, processes: args.processes });
        }
        for (value, flag) in [
            (args.epoch_records, "--epoch-records"),
            (args.epoch_bytes, "--epoch-bytes"),
            (args.max_bytes_in_flight, "--max-bytes-in-flight"),
            (args.batch_size, "--batch-size"),
            (args.sink_connections.unwrap_or(1), "--sink-connections"),
            (args.max_epochs_in_flight as usize, "--max-epochs-in-flight"),
            (args.database_timeout.as_millis().min(1) as usize, "--database-timeout (in milliseconds)"),
            (args.metadata_interval.as_millis().min(1) as usize, "--metadata-interval (in milliseconds)"),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(flag));
            }
        }
        if args.max_message_bytes > crate::record::MAX_MESSAGE_BYTES {
            return Err(ConfigError::MessageBytesAboveCeiling(args.max_message_bytes));
        }
        let addresses = cluster_addresses(&args)?;
        if args.alert_resend_interval.is_zero() {
            return Err(ConfigError::Zero("--alert-resend-interval"));
        }
        // Each server keeps the longest `for` plus the lateness of minutes in memory, and
        // Alertmanager holds a firing alert for four resend intervals: both stay bounded.
        if args.alert_lateness > MAX_ALERT_LATENESS {
            return Err(ConfigError::Alerts(format!(
                "--alert-lateness {} is longer than the most a server's window keeps ({})",
                humantime::format_duration(args.alert_lateness),
                humantime::format_duration(MAX_ALERT_LATENESS)
            )));
        }
        if args.alert_resend_interval > MAX_ALERT_RESEND_INTERVAL {
            return Err(ConfigError::Alerts(format!(
                "--alert-resend-interval {} is longer than {}: Alertmanager would keep a resolved alert firing that long",
                humantime::format_duration(args.alert_resend_interval),
                humantime::format_duration(MAX_ALERT_RESEND_INTERVAL)
            )));
        }
        if let Some(url) = &args.alertmanager_url {
            crate::alerts::alertmanager::Alertmanager::new(url, args.alert_resend_interval)
                .map_err(|e| ConfigError::Alerts(e.to_string()))?;
            if args.alert_rules.is_empty() {
                return Err(ConfigError::Alerts(
                    "--alertmanager-url is set but the config file has no [[alert]] rules".into(),
                ));
            }
        }
        Ok(JobConfig {
            alerts: crate::alerts::AlertConfig {
                rules: args.alert_rules,
                lateness: args.alert_lateness,
                alertmanager_url: args.alertmanager_url,
                resend_interval: args.alert_resend_interval,
            },
            cluster: Cluster {
                workers: args.workers,
                processes: args.processes,
                process_id: args.process_id,
                addresses,
                connect_timeout: args.connect_timeout,
            },
            topic: TopicConfig {
                start: args.start,
                on_reset: args.on_topic_reset,
                take_over: args.take_over,
                stall_timeout: args.stall_timeout,
                metadata_interval: args.metadata_interval,
            },
            epochs: Epochs {
                records: args.epoch_records,
                bytes: args.epoch_bytes,
                interval: args.epoch_interval,
                max_in_flight: args.max_epochs_in_flight,
                max_bytes_in_flight: args.max_bytes_in_flight,
            },
            sink: SinkConfig {
                batch_size: args.batch_size,
                connections: args.sink_connections,
                dedup: args.dedup,
                rollups: args.rollups,
                audit: args.audit,
                timeout: args.database_timeout,
                silent_after: args.silent_after,
                retain: args.retain,
            },
            limits: Limits { max_bytes: args.max_message_bytes, max_age: args.max_age, max_future: args.max_future },
            commit_interval: args.commit_interval,
            exit_when_idle: args.exit_when_idle,
            report_interval: args.report_interval,
            shutdown_timeout: args.shutdown_timeout,
            metrics_listen: args.metrics_listen,
            summary_json: args.summary_json,
            group: args.group,
            kafka: args.kafka.into(),
            database: args.database.into(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--workers must be at least 1")]
    NoWorkers,
    #[error("--processes must be at least 1")]
    NoProcesses,
    #[error("--process-id {id} is outside --processes {processes} (valid ids: 0 to {})", processes - 1)]
    ProcessIdOutOfRange { id: usize, processes: usize },
    #[error("--processes is {processes} but {source_name} lists {found} address(es); give one host:port per process")]
    AddressCount { processes: usize, found: usize, source_name: String },
    #[error("cannot read --hostfile {path}: {source}")]
    Hostfile { path: PathBuf, source: std::io::Error },
    #[error("address {0:?} in the host list is not host:port")]
    BadAddress(String),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("--max-message-bytes {0} is above the ceiling of {max} bytes (1 MiB)", max = crate::record::MAX_MESSAGE_BYTES)]
    MessageBytesAboveCeiling(usize),
    #[error("cannot read --config {path}: {message}")]
    ConfigFile { path: PathBuf, message: String },
    #[error("{0}")]
    Alerts(String),
    #[error("in {path}: {source}")]
    AlertRule { path: PathBuf, source: crate::alerts::rules::RuleError },
    #[error("unknown key `{key}` in {path} (keys are flag names such as epoch-records; librdkafka settings go under [kafka])")]
    UnknownKey { key: String, path: PathBuf },
}

/// A parsed `--config` file.
#[derive(Debug, Default, PartialEq)]
pub struct ConfigFile {
    /// (environment variable, value) for each flag the file sets.
    pub env: Vec<(String, String)>,
    /// librdkafka settings from the `[kafka]` table.
    pub kafka: Vec<(String, String)>,
    /// The `[[alert]]` rules, checked.
    pub alert_rules: crate::alerts::rules::AlertRules,
}

/// Parses a TOML config file whose top-level keys mirror the flags of any subcommand
/// (`epoch-records` or `epoch_records`) and whose `[kafka]` table passes librdkafka settings
/// through. The caller installs `env` as defaults for unset variables, which gives the
/// precedence flag > environment > file > default. Unknown keys are rejected by name.
pub fn parse_config_file(path: &Path, text: &str, cli: &clap::Command) -> Result<ConfigFile, ConfigError> {
    let bad = |message: String| ConfigError::ConfigFile { path: path.to_owned(), message };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| bad(e.message().to_owned()))?;
    let mut flags = std::collections::HashMap::new();
    let mut stack = vec![cli.clone()];
    while let Some(command) = stack.pop() {
        for arg in command.get_arguments() {
            if let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) {
                flags.insert(long.to_owned(), env.to_string_lossy().into_owned());
            }
        }
        stack.extend(command.get_subcommands().cloned());
    }
    let mut file = ConfigFile::default();
    for (key, value) in table {
        if key == "kafka" {
            let toml::Value::Table(kafka) = value else { return Err(bad("[kafka] must be a table".into())) };
            for (k, v) in kafka {
                file.kafka.push((k.clone(), scalar(&v).ok_or_else(|| bad(format!("kafka.{k} must be a value")))?));
            }
            continue;
        }
        if key == "alert" {
            file.alert_rules = crate::alerts::rules::parse_rules(value)
                .map_err(|source| ConfigError::AlertRule { path: path.to_owned(), source })?;
            continue;
        }
        let env = flags
            .get(&key.replace('_', "-"))
            .ok_or_else(|| ConfigError::UnknownKey { key: key.clone(), path: path.to_owned() })?;
        file.env.push((env.clone(), scalar(&value).ok_or_else(|| bad(format!("{key} must be a value or a list")))?));
    }
    Ok(file)
}

fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(items) => items.iter().map(scalar).collect::<Option<Vec<_>>>().map(|v| v.join(",")),
        _ => None,
    }
}

/// The host:port of every process, in process-id order (empty for a single process).
pub fn cluster_addresses(args: &RunArgs) -> Result<Vec<String>, ConfigError> {
    let (addresses, source_name) = match &args.hostfile {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Hostfile { path: path.clone(), source })?;
            let hosts: Vec<String> = text
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            (hosts, format!("--hostfile {}", path.display()))
        }
        None => {
            (args.hosts.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect(), "--hosts".to_owned())
        }
    };
    if let Some(bad) =
        addresses.iter().find(|a: &&String| a.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_err()))
    {
        return Err(ConfigError::BadAddress(bad.clone()));
    }
    if (args.processes > 1 || !addresses.is_empty()) && addresses.len() != args.processes {
        return Err(ConfigError::AddressCount { processes: args.processes, found: addresses.len(), source_name });
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn run_args(extra: &[&str]) -> RunArgs {
        let argv = ["fleetflow", "run"].iter().chain(extra).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(r) => r,
            _ => unreachable!(),
        }
    }

    #[test]
    fn single_process_needs_no_addresses() {
        let config = JobConfig::from_args(run_args(&["-w", "3"])).unwrap();
        assert!(config.cluster.addresses.is_empty());
        assert!(matches!(config.cluster.timely().communication, timely::CommunicationConfig::Process(3)));
    }

    #[test]
    fn every_flag_lands_in_the_typed_config() {
        let config = JobConfig::from_args(run_args(&[
            "--brokers",
            "k:1",
            "--topic",
            "t",
            "-X",
            "a=b",
            "--database-url",
            "postgres://x",
            "--epoch-records",
            "7",
            "--sink-connections",
            "3",
            "--dedup",
            "natural-key",
            "--rollups",
            "false",
            "--start",
            "latest",
            "--on-topic-reset",
            "start-over",
            "--max-message-bytes",
            "100",
            "--summary-json",
            "s.json",
        ]))
        .unwrap();
        assert_eq!(
            config.kafka,
            KafkaConfig { options: vec![("a".into(), "b".into())], ..KafkaConfig::new("k:1", "t") }
        );
        assert_eq!(config.database.url, "postgres://x");
        assert_eq!((config.epochs.records, config.sink.connections), (7, Some(3)));
        assert_eq!((config.sink.dedup, config.sink.rollups), (Dedup::NaturalKey, false));
        assert_eq!((config.topic.start, config.topic.on_reset), (StartFrom::Latest, OnTopicReset::StartOver));
        assert_eq!(config.limits.max_bytes, 100);
        assert_eq!(config.summary_json.as_deref(), Some(Path::new("s.json")));
    }

    #[test]
    fn zero_sizes_are_refused_by_flag_name() {
        for (flag, line) in [
            ("--epoch-records", "--epoch-records must be at least 1"),
            ("--batch-size", "--batch-size must be at least 1"),
            ("--max-epochs-in-flight", "--max-epochs-in-flight must be at least 1"),
            ("--sink-connections", "--sink-connections must be at least 1"),
        ] {
            let err = JobConfig::from_args(run_args(&[flag, "0"])).unwrap_err();
            assert_eq!(err.to_string(), line);
        }
    }

    #[test]
    fn alert_windows_that_would_grow_without_bound_are_refused() {
        let err = JobConfig::from_args(run_args(&["--alert-lateness", "2h"])).unwrap_err();
        assert_eq!(err.to_string(), "--alert-lateness 2h is longer than the most a server's window keeps (1h)");
        let err = JobConfig::from_args(run_args(&["--alert-resend-interval", "100000000h"])).unwrap_err();
        assert!(
            err.to_string().starts_with("--alert-resend-interval 11407years")
                && err.to_string().contains("longer than 1h"),
            "{err}"
        );
        assert!(JobConfig::from_args(run_args(&["--alert-lateness", "1h", "--alert-resend-interval", "1h"])).is_ok());
    }

    #[test]
    fn process_id_must_be_below_processes() {
        let err = JobConfig::from_args(run_args(&["-n", "2", "-p", "2", "--hosts", "a:1,b:2"])).unwrap_err();
        assert_eq!(err.to_string(), "--process-id 2 is outside --processes 2 (valid ids: 0 to 1)");
    }

    #[test]
    fn host_list_must_match_processes() {
        let err = JobConfig::from_args(run_args(&["-n", "3", "--hosts", "a:1,b:2"])).unwrap_err();
        assert!(matches!(err, ConfigError::AddressCount { processes: 3, found: 2, .. }), "{err}");
    }

    #[test]
    fn hostfile_ignores_comments_and_blank_lines() {
        let path = std::env::temp_dir().join(format!("fleetflow-hostfile-{}", std::process::id()));
        std::fs::write(&path, "# the job\n127.0.0.1:2101\n\n127.0.0.1:2102  # second\n").unwrap();
        let args = run_args(&["-n", "2", "--hostfile", path.to_str().unwrap()]);
        assert_eq!(cluster_addresses(&args).unwrap(), vec!["127.0.0.1:2101", "127.0.0.1:2102"]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn config_file_keys_map_to_flag_variables() {
        let cli = <Cli as clap::CommandFactory>::command();
        let text =
            "workers = 3\nepoch_records = 500\nhosts = [\"a:1\", \"b:2\"]\n[kafka]\n\"security.protocol\" = \"ssl\"\n";
        let file = parse_config_file(Path::new("f.toml"), text, &cli).unwrap();
        assert!(file.env.contains(&("FLEETFLOW_WORKERS".into(), "3".into())));
        assert!(file.env.contains(&("FLEETFLOW_EPOCH_RECORDS".into(), "500".into())));
        assert!(file.env.contains(&("FLEETFLOW_HOSTS".into(), "a:1,b:2".into())));
        assert_eq!(file.kafka, vec![("security.protocol".into(), "ssl".into())]);
    }

    #[test]
    fn config_file_rejects_unknown_keys_by_name() {
        let cli = <Cli as clap::CommandFactory>::command();
        let err = parse_config_file(Path::new("f.toml"), "workers = 2\nworkerz = 3\n", &cli).unwrap_err();
        assert!(err.to_string().starts_with("unknown key `workerz` in f.toml"), "{err}");
        let err = parse_config_file(Path::new("f.toml"), "workers = ", &cli).unwrap_err();
        assert!(matches!(err, ConfigError::ConfigFile { .. }), "{err}");
    }

    #[test]
    fn max_message_bytes_has_a_ceiling() {
        assert!(JobConfig::from_args(run_args(&["--max-message-bytes", "1048576"])).is_ok());
        let err = JobConfig::from_args(run_args(&["--max-message-bytes", "1048577"])).unwrap_err();
        assert_eq!(err.to_string(), "--max-message-bytes 1048577 is above the ceiling of 1048576 bytes (1 MiB)");
    }

    #[test]
    fn addresses_need_a_port() {
        let err = JobConfig::from_args(run_args(&["-n", "2", "--hosts", "a:1,b"])).unwrap_err();
        assert!(matches!(err, ConfigError::BadAddress(ref a) if a == "b"), "{err}");
    }
}
