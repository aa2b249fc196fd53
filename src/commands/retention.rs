//! `fleetflow retention`: drops raw chunks older than a duration.

use fleetflow::cli::RetentionArgs;

use super::{out, runtime};

pub fn run(args: RetentionArgs) -> anyhow::Result<()> {
    out(&format!("{}\n", runtime()?.block_on(fleetflow::ops::retention(args))?))
}
