//! `fleetflow loadgen`: simulated fleet metrics to Kafka or the gateway, until the count is
//! sent or SIGINT/SIGTERM.

use fleetflow::cli::LoadgenArgs;
use fleetflow::lifecycle::Shutdown;

use super::out;

pub fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let stop = Shutdown::on_signals()?;
    let report = fleetflow::loadgen::produce(&args, &stop.flag())?;
    out(&format!(
        "loadgen: sent {} records ({} of them repeats) in {:.2} s ({:.0} records/s); {} acknowledged, {} rejected as invalid, {} failed\n",
        report.sent,
        report.duplicates,
        report.seconds,
        report.sent as f64 / report.seconds.max(1e-9),
        report.delivered,
        report.rejected,
        report.failed
    ))?;
    anyhow::ensure!(report.failed == 0, "{} records were not acknowledged by Kafka", report.failed);
    Ok(())
}
