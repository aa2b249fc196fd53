//! Versioned schema migrations, safe to run from several processes at once (they take a
//! PostgreSQL advisory lock, so one applies and the others find the work done).

use tokio_postgres::Client;

use super::{describe_target, SinkError};

/// Arbitrary, fixed key for the migration advisory lock.
const MIGRATION_LOCK: i64 = 0x666c_6565_7466;

/// Each migration: (version, what it does, SQL). Append only; never edit an applied one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "raw metrics hypertable, committed offsets, exactly-once watermarks, dead letters, audit",
        r#"
    CREATE TABLE metrics (
        time            timestamptz      NOT NULL,
        server_id       text             NOT NULL,
        cpu             double precision,
        ram             double precision,
        extra           jsonb,
        kafka_partition integer          NOT NULL,
        kafka_offset    bigint           NOT NULL
    );
    SELECT create_hypertable('metrics', 'time', chunk_time_interval => interval '1 day');

    -- Next offset to read per partition: where a restarted job resumes.
    CREATE TABLE fleetflow_offsets (
        topic        text        NOT NULL,
        partition    integer     NOT NULL,
        next_offset  bigint      NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (topic, partition)
    );

    -- Highest offset written per (key group, partition), updated in the same transaction
    -- as the rows: a replayed record at or below it is already in the database.
    CREATE TABLE fleetflow_watermarks (
        topic       text    NOT NULL,
        key_group   integer NOT NULL,
        partition   integer NOT NULL,
        last_offset bigint  NOT NULL,
        PRIMARY KEY (topic, key_group, partition)
    );

    CREATE TABLE fleetflow_dead_letters (
        topic        text        NOT NULL,
        partition    integer     NOT NULL,
        "offset"     bigint      NOT NULL,
        key          bytea,
        raw          bytea       NOT NULL,
        kind         text        NOT NULL,
        reason       text        NOT NULL,
        message_time timestamptz,
        recorded_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX fleetflow_dead_letters_position ON fleetflow_dead_letters (topic, partition, "offset");

    -- Filled only with `run --audit`: which worker wrote which serverIds.
    CREATE TABLE fleetflow_audit (
        run_id     text        NOT NULL,
        worker     integer     NOT NULL,
        server_id  text        NOT NULL,
        rows       integer     NOT NULL,
        written_at timestamptz NOT NULL DEFAULT now()
    );
    "#,
    ),
    (2, "per-minute rollups: metrics_1m, fleet_hist_1m, fleet_1m, silent_servers", super::rollups::MIGRATION),
    (
        3,
        "fencing generations per topic; dead letters keep the original length and hash of capped raw bytes",
        r#"
    -- One row per topic: the generation of the job that holds it (see sink::fence).
    CREATE TABLE fleetflow_jobs (
        topic      text        PRIMARY KEY,
        generation bigint      NOT NULL,
        holder     text        NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now()
    );

    -- raw keeps at most the first bytes of a large message; these describe all of it.
    ALTER TABLE fleetflow_dead_letters ADD COLUMN raw_length bigint, ADD COLUMN raw_sha256 bytea;
    UPDATE fleetflow_dead_letters SET raw_length = length(raw), raw_sha256 = sha256(raw);
    "#,
    ),
    (4, "partition events: skipped offsets, stalls, added partitions, topic start-overs", super::events::MIGRATION),
    (
        5,
        "offset landmarks: the last message read below each committed offset (kafka::landmarks)",
        "ALTER TABLE fleetflow_offsets ADD COLUMN landmark_offset bigint, ADD COLUMN landmark_time_ms bigint,
             ADD COLUMN landmark_hash bigint;",
    ),
    (6, "alerts: the episodes of the [[alert]] rules (alerts::sink)", crate::alerts::sink::MIGRATION),
    (
        7,
        "key groups hash like Kafka's partitioner (murmur2); the FNV-1a watermarks move aside, frozen",
        r#"
    -- First fence off any job of an older version still running: the update waits for its
    -- transaction in progress (which holds its generation FOR SHARE) and its next one finds
    -- a newer generation and stops (sink::fence), so no FNV watermark is raised after the move.
    UPDATE fleetflow_jobs SET generation = generation + 1;
    -- The watermarks of the FNV-1a key groups, kept for the messages a job of an older
    -- version wrote and a restart replays (sink::watermarks::FnvWatermarks).
    CREATE TABLE fleetflow_fnv_watermarks (LIKE fleetflow_watermarks INCLUDING ALL);
    INSERT INTO fleetflow_fnv_watermarks SELECT * FROM fleetflow_watermarks;
    DELETE FROM fleetflow_watermarks;
    "#,
    ),
];

/// The newest schema version this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Enables timescaledb and applies every pending migration. Returns the schema version.
pub async fn migrate(client: &mut Client, url: &str) -> Result<i32, SinkError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = migrate_locked(client, url).await;
    // A failed unlock only matters if the connection lives on; it is dropped on error anyway.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    result
}

async fn migrate_locked(client: &mut Client, url: &str) -> Result<i32, SinkError> {
    ensure_timescaledb(client, url).await?;
    // Checked first rather than IF NOT EXISTS, which logs a notice on every start.
    let exists: bool =
        client.query_one("SELECT to_regclass('fleetflow_schema_version') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS fleetflow_schema_version (
                    version    integer     PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now(),
                    summary    text        NOT NULL)",
            )
            .await?;
    }
    let row = client.query_one("SELECT coalesce(max(version), 0) FROM fleetflow_schema_version", &[]).await?;
    let mut current: i32 = row.get(0);
    if current > latest_version() {
        return Err(SinkError::SchemaTooNew { found: current, known: latest_version() });
    }
    let pending: Vec<_> = MIGRATIONS.iter().filter(|m| m.0 > current).collect();
    for (version, summary, sql) in pending {
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO fleetflow_schema_version (version, summary) VALUES ($1, $2)", &[version, summary])
            .await?;
        tx.commit().await?;
        tracing::info!(version, summary, "applied schema migration");
        current = *version;
    }
    Ok(current)
}

/// Name of the optional unique index behind `--dedup natural-key`.
const NATURAL_KEY_INDEX: &str = "metrics_natural_key";

/// Creates the natural-key unique index when asked to; returns whether it exists (an index
/// left by an earlier `--dedup natural-key` run keeps that mode on, since a plain COPY of a
/// duplicate would now fail).
pub async fn natural_key_index(client: &Client, create: bool) -> Result<bool, SinkError> {
    // Processes of a job start together: one creates the index, the others find it.
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = natural_key_index_locked(client, create).await;
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    result
}

async fn natural_key_index_locked(client: &Client, create: bool) -> Result<bool, SinkError> {
    let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&NATURAL_KEY_INDEX]).await?.get(0);
    if exists || !create {
        return Ok(exists);
    }
    tracing::info!("creating the unique index on metrics (server_id, time) for --dedup natural-key");
    client
        .batch_execute(&format!("CREATE UNIQUE INDEX IF NOT EXISTS {NATURAL_KEY_INDEX} ON metrics (server_id, time)"))
        .await
        .map_err(|e| {
            SinkError::NaturalKey(e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string()))
        })?;
    Ok(true)
}

async fn ensure_timescaledb(client: &Client, url: &str) -> Result<(), SinkError> {
    let installed = client.query_opt("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'", &[]).await?;
    if installed.is_some() {
        return Ok(());
    }
    let available =
        client.query_opt("SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'", &[]).await?;
    if available.is_none() {
        return Err(SinkError::NoTimescale(describe_target(url)));
    }
    client.batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb").await.map_err(|e| {
        SinkError::TimescaleUnusable {
            target: describe_target(url),
            message: e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string()),
        }
    })?;
    Ok(())
}
