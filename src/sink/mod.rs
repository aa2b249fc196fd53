//! TimescaleDB: everything the job keeps in the database, one module per concern.
//!
//! - `schema`: the tables, as versioned migrations.
//! - `writer`: the epoch writer task; one transaction per group of epochs, retries,
//!   timeouts, finding the rows the database refuses.
//! - `copy`: binary COPY of metric rows (the hot path) and the benchmark's ceiling.
//! - `watermarks`: the exactly-once filter; which records are new, and raising the marks
//!   in the rows' transaction.
//! - `rollups`: per-minute aggregates, in the rows' transaction.
//! - `dead_letters`: messages that did not become rows, in the rows' transaction.
//! - `audit`: the `--audit` table (which worker wrote which serverIds).
//! - `offsets`: the committed source offsets, where a restart resumes.
//! - `fence`: at most one copy of the job writes a topic.
//! - `events`: what an operator must hear of about the topic's partitions (`fleetflow status`).
//!
//! Here: connecting, and what database errors mean. See docs/architecture.md for how the
//! pieces keep the exactly-once promise.

pub mod audit;
pub mod copy;
pub mod dead_letters;
pub mod events;
pub mod fence;
pub mod offsets;
pub mod rollups;
pub mod schema;
pub mod watermarks;
pub mod writer;

use std::time::Duration;

use tokio_postgres::Client;

/// Maps on the write path: keys are small integers and short strings hashed per row, where
/// std's DoS-resistant SipHash showed up in profiles; nothing here is attacker-chosen at scale.
pub type FastMap<K, V> = fnv::FnvHashMap<K, V>;

/// Errors talking to the database, worded for the person who has to fix them.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("invalid database URL: {0}")]
    BadUrl(String),
    #[error("cannot reach the database at {target}: {source}")]
    Unreachable { target: String, source: tokio_postgres::Error },
    #[error("the database at {0} has no timescaledb extension available; install TimescaleDB (scripts/timescaledb.sh up gives a local one)")]
    NoTimescale(String),
    #[error("the timescaledb extension could not be enabled at {target}: {message}")]
    TimescaleUnusable { target: String, message: String },
    #[error("the database schema is at version {found}, newer than this fleetflow knows ({known}); upgrade fleetflow")]
    SchemaTooNew { found: i32, known: i32 },
    #[error("cannot enable --dedup natural-key (metrics may already hold duplicate (server_id, time) rows): {0}")]
    NaturalKey(String),
    #[error("database error: {}", describe_db_error(.0))]
    Db(#[from] tokio_postgres::Error),
    /// The database did not answer a write or commit in time (a hung server or session).
    #[error("the database did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Another copy of the job holds the topic: this one must stop writing.
    #[error("{0}")]
    Fenced(String),
}

/// A database error as one line with everything PostgreSQL said: message, SQLSTATE, detail,
/// hint, and where (tokio-postgres's own `Display` says only "db error").
pub fn describe_db_error(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        // I/O and protocol errors keep their cause in `source()`.
        return match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        };
    };
    let mut line = format!("{} (SQLSTATE {})", db.message(), db.code().code());
    if let Some(detail) = db.detail() {
        line.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = db.hint() {
        line.push_str(&format!("; hint: {hint}"));
    }
    if let Some(context) = db.where_() {
        line.push_str(&format!("; where: {}", context.replace('\n', " / ")));
    }
    line
}

/// True when PostgreSQL refused the statement because of the data it carried (a value it
/// cannot store, a constraint a row violates): SQLSTATE classes 22 (data exception) and 23
/// (integrity constraint violation). Such an error can be pinned on rows; nothing else can.
pub fn is_data_error(e: &SinkError) -> bool {
    match e {
        SinkError::Db(e) => e.code().is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
        _ => false,
    }
}

impl SinkError {
    /// Errors a retry can cure (connection lost, server restarting); anything else is a bug
    /// or a configuration problem that retrying would only hide.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Unreachable { .. } | SinkError::Timeout(_) => true,
            SinkError::Db(e) => is_transient(e),
            _ => false,
        }
    }
}

/// True for errors a retry can cure: closed connections, I/O errors, a server shutting down
/// or starting, serialization failures.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true, // I/O and protocol errors
        Some(code) => {
            let c = code.code();
            // 57014: a statement cancelled by statement_timeout (a hung lock or session).
            c.starts_with("08") || c.starts_with("57P") || c == "57014" || c == "40001" || c == "40P01" || c == "53300"
        }
    }
}

/// host:port/dbname of a connection string, without user or password (for messages).
pub fn describe_target(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", c.get_dbname().unwrap_or("postgres"))
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

/// Connects, spawning the connection task on the current runtime.
pub async fn connect(url: &str) -> Result<Client, SinkError> {
    connect_as(url, "fleetflow").await
}

/// Connects with an application name (visible in `pg_stat_activity`; the job's writers use
/// it so a taking-over job can find the sessions of the one it replaces).
///
/// TCP keepalives are on, so a server or network that vanished without closing the
/// connection is noticed in about a minute rather than the kernel's two hours.
pub async fn connect_as(url: &str, application_name: &str) -> Result<Client, SinkError> {
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|e: tokio_postgres::Error| SinkError::BadUrl(e.to_string()))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.application_name(application_name);
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        // tokio-postgres's default is the kernel's two hours; the URL may set its own.
        config.keepalives_idle(Duration::from_secs(30));
        config.keepalives_interval(Duration::from_secs(10));
        config.keepalives_retries(3);
    }
    // Notices (IF NOT EXISTS, ...) would otherwise be logged on every start.
    config.options("-c client_min_messages=warning");
    let (client, connection) = config
        .connect(tls()?)
        .await
        .map_err(|source| SinkError::Unreachable { target: describe_target(url), source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// TLS for the database connection, as the URL's `sslmode` asks: `disable` never uses it,
/// `prefer` (the default) uses it when the server offers it, `require` insists. Certificates
/// are verified against the system's CA store, read once per process: reading it parses
/// every certificate of the bundle (about 25 ms of CPU), and a 1x1 job opens 8 connections
/// at start. Read per connection, it was 14% of a 2x1 drain's CPU in the profile.
fn tls() -> Result<postgres_native_tls::MakeTlsConnector, SinkError> {
    static CONNECTOR: std::sync::OnceLock<Result<native_tls::TlsConnector, String>> = std::sync::OnceLock::new();
    match CONNECTOR.get_or_init(|| native_tls::TlsConnector::builder().build().map_err(|e| e.to_string())) {
        Ok(connector) => Ok(postgres_native_tls::MakeTlsConnector::new(connector.clone())),
        Err(e) => Err(SinkError::BadUrl(format!("TLS setup failed: {e}"))),
    }
}

/// Exponential backoff for reconnecting: 100 ms doubling up to 5 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(5))
}
