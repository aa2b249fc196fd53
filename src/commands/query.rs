//! `fleetflow query`: the analysts' questions, answered from the rollups.

use fleetflow::cli::QueryArgs;

use super::{out, runtime};

pub fn run(args: QueryArgs) -> anyhow::Result<()> {
    out(&runtime()?.block_on(fleetflow::query::run(args))?)
}
