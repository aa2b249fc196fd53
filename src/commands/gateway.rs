//! `fleetflow gateway`: the HTTP ingest gateway in front of Kafka, until SIGINT/SIGTERM.

use fleetflow::cli::GatewayArgs;

pub fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(fleetflow::gateway::serve(args))
}
