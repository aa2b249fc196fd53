//! `fleetflow status`: committed offsets, lag, last commit, dead letters, the topic's holder.

use fleetflow::cli::StatusArgs;

use super::{out, runtime};

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    out(&runtime()?.block_on(fleetflow::ops::status(args))?)
}
