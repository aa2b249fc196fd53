//! The `--audit` table (`fleetflow_audit`): per write transaction, which worker wrote how
//! many rows of which serverIds.
//!
//! Written in the rows' own transaction, after the exactly-once filter and without the rows
//! the database refused, so a replayed record is not counted again; tests use it to check
//! that each serverId has one writer. Off by default: it costs a statement per transaction.

use tokio_postgres::Transaction;

use super::{FastMap, SinkError};
use crate::envelope::{Envelope, Item};

pub(super) async fn audit(
    tx: &Transaction<'_>,
    run: &str,
    worker: usize,
    batches: &[Vec<&Envelope>],
) -> Result<(), SinkError> {
    let mut per_server: FastMap<&str, i32> = FastMap::default();
    for env in batches.iter().flatten() {
        if let Item::Metric(m) = &env.item {
            *per_server.entry(m.server_id.as_str()).or_default() += 1;
        }
    }
    let servers: Vec<&str> = per_server.keys().copied().collect();
    let rows: Vec<i32> = servers.iter().map(|s| per_server[s]).collect();
    tx.execute(
        "INSERT INTO fleetflow_audit (run_id, worker, server_id, rows)
         SELECT $1, $2, s, r FROM unnest($3::text[], $4::int[]) AS t(s, r)",
        &[&run, &(worker as i32), &servers, &rows],
    )
    .await?;
    Ok(())
}
