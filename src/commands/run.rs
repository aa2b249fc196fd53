//! `fleetflow run`: the ingest job (the library's `job::run`).

use fleetflow::cli::RunArgs;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    fleetflow::job::run(args)
}
