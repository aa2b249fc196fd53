//! `fleetflow check`: the configuration and every service the job needs, line by line.

use fleetflow::cli::RunArgs;

use super::{out, runtime};

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let (report, ok) = runtime()?.block_on(fleetflow::ops::check(args));
    out(&report)?;
    anyhow::ensure!(ok, "some checks failed (see above)");
    Ok(())
}
