//! The `fleetflow` binary: parse the command line, dispatch, and turn any error into one
//! line on stderr and a non-zero exit.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use fleetflow::cli::{Cli, Command, TopicCommand};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("fleetflow: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    init_logging();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => fleetflow::job::run(args),
        Command::Loadgen(args) => {
            let stop = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
            signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
            let report = fleetflow::loadgen::produce(&args, &stop)?;
            println!(
                "loadgen: sent {} records ({} of them repeats) in {:.2} s ({:.0} records/s); {} acknowledged, {} rejected as invalid, {} failed",
                report.sent,
                report.duplicates,
                report.seconds,
                report.sent as f64 / report.seconds.max(1e-9),
                report.delivered,
                report.rejected,
                report.failed
            );
            anyhow::ensure!(
                report.failed == 0,
                "{} records were not acknowledged by Kafka",
                report.failed
            );
            Ok(())
        }
        Command::Topic(TopicCommand::Create {
            kafka,
            partitions,
            replication,
        }) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(fleetflow::kafka::admin::create_topic(
                &kafka,
                partitions,
                replication,
            ))?;
            println!(
                "topic {:?} ready on {} ({partitions} partitions)",
                kafka.topic, kafka.brokers
            );
            Ok(())
        }
        Command::Gateway(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(fleetflow::gateway::serve(args))
        }
        Command::Bench(args) => {
            let output = args.output.clone();
            let report = fleetflow::bench::run(args)?;
            print!("{}", fleetflow::bench::table(&report));
            std::fs::write(&output, serde_json::to_string_pretty(&report)?)?;
            println!("written to {}", output.display());
            Ok(())
        }
        Command::Migrate(db) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let version = runtime.block_on(async {
                let mut client = fleetflow::sink::connect(&db.database_url).await?;
                fleetflow::sink::schema::migrate(&mut client, &db.database_url).await
            })?;
            println!("schema at version {version}");
            Ok(())
        }
    }
}

/// Logs go to stderr; `FLEETFLOW_LOG` (or `RUST_LOG`) sets the filter, default `info`.
fn init_logging() {
    let filter = std::env::var("FLEETFLOW_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,rdkafka=warn".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and CI output stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
