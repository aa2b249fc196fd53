//! `fleetflow bench`: the job against its ceilings; prints a table, writes the JSON report.

use fleetflow::cli::BenchArgs;

use super::out;

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let output = args.output.clone();
    let report = fleetflow::bench::run(args)?;
    out(&fleetflow::bench::table(&report))?;
    std::fs::write(&output, serde_json::to_string_pretty(&report)?)?;
    out(&format!("written to {}\n", output.display()))
}
