//! `fleetflow run`: the ingest job (the library's `job::run`), given the checked
//! configuration.

use fleetflow::cli::RunArgs;
use fleetflow::config::JobConfig;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let summary = args.summary_json.clone();
    let config = JobConfig::from_args(args).inspect_err(|_| {
        // A wrong flag ends the run before it starts: no summary of an earlier run may pass
        // for this one's.
        if let Some(path) = summary {
            let _ = std::fs::remove_file(path);
        }
    })?;
    fleetflow::job::run(config)
}
