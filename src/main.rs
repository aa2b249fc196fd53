//! The `fleetflow` binary: parse the command line, dispatch, and turn any error into one
//! line on stderr and a non-zero exit.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use fleetflow::cli::{Cli, Command, TopicCommand};

fn main() -> ExitCode {
    let kafka_from_file = match load_config_file() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("fleetflow: {e}");
            return fleetflow::exit::Exit::Usage.into();
        }
    };
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut first = lines.next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_owned();
            // "the following required arguments were not provided:" names them on the next line.
            if first.ends_with(':') {
                first = format!("{first} {}", lines.next().unwrap_or_default());
            }
            eprintln!("fleetflow: {first} (see --help)");
            return fleetflow::exit::Exit::Usage.into();
        }
    };
    if let Some(kafka) = kafka_args(&mut cli.command) {
        // File settings first, so the user's -X flags override them.
        let flags = std::mem::take(&mut kafka.kafka_options);
        kafka.kafka_options = kafka_from_file.into_iter().chain(flags).collect();
    }
    init_logging();
    match dispatch(cli.command) {
        Ok(()) => fleetflow::exit::Exit::Ok.into(),
        Err(e) => {
            eprintln!("fleetflow: {}", fleetflow::one_line(&e));
            fleetflow::exit::Exit::Error.into()
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
        Command::Topic(TopicCommand::Create { kafka, partitions, replication }) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(fleetflow::kafka::admin::create_topic(&kafka, partitions, replication))?;
            out(&format!("topic {:?} ready on {} ({partitions} partitions)\n", kafka.topic, kafka.brokers))?;
            Ok(())
        }
        Command::Gateway(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(fleetflow::gateway::serve(args))
        }
        Command::Bench(args) => {
            let output = args.output.clone();
            let report = fleetflow::bench::run(args)?;
            out(&fleetflow::bench::table(&report))?;
            std::fs::write(&output, serde_json::to_string_pretty(&report)?)?;
            out(&format!("written to {}\n", output.display()))?;
            Ok(())
        }
        Command::Status(args) => {
            out(&runtime()?.block_on(fleetflow::ops::status(args))?)?;
            Ok(())
        }
        Command::Check(args) => {
            let (report, ok) = runtime()?.block_on(fleetflow::ops::check(args));
            out(&report)?;
            anyhow::ensure!(ok, "some checks failed (see above)");
            Ok(())
        }
        Command::Retention(args) => {
            out(&format!("{}\n", runtime()?.block_on(fleetflow::ops::retention(args))?))?;
            Ok(())
        }
        Command::Query(args) => {
            out(&runtime()?.block_on(fleetflow::query::run(args))?)?;
            Ok(())
        }
        Command::Migrate(db) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let version = runtime.block_on(async {
                let mut client = fleetflow::sink::connect(&db.database_url).await?;
                fleetflow::sink::schema::migrate(&mut client, &db.database_url).await
            })?;
            out(&format!("schema at version {version}\n"))?;
            Ok(())
        }
    }
}

/// Writes a command's output to stdout. A reader that went away (`fleetflow query ... | head`)
/// ends the command quietly, as it does for other command-line tools.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        result => Ok(result?),
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Reads `--config FILE` (or FLEETFLOW_CONFIG) before the flags are parsed: each key becomes
/// the default of its FLEETFLOW_* variable unless that is set, so flags > env > file >
/// defaults. Returns the file's `[kafka]` settings.
fn load_config_file() -> Result<Vec<(String, String)>, fleetflow::config::ConfigError> {
    let args: Vec<String> = std::env::args().collect();
    let from_flag = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=")
            .map(str::to_owned)
            .or_else(|| (a == "--config").then(|| args.get(i + 1).cloned()).flatten())
    });
    let Some(path) = from_flag.or_else(|| std::env::var("FLEETFLOW_CONFIG").ok()) else { return Ok(Vec::new()) };
    let path = std::path::PathBuf::from(path);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| fleetflow::config::ConfigError::ConfigFile { path: path.clone(), message: e.to_string() })?;
    let file = fleetflow::config::parse_config_file(&path, &text, &<Cli as clap::CommandFactory>::command())?;
    for (env, value) in file.env {
        if std::env::var_os(&env).is_none() {
            // Single-threaded here: nothing else reads the environment yet.
            std::env::set_var(env, value);
        }
    }
    Ok(file.kafka)
}

fn kafka_args(command: &mut Command) -> Option<&mut fleetflow::cli::KafkaArgs> {
    match command {
        Command::Run(a) | Command::Check(a) => Some(&mut a.kafka),
        Command::Loadgen(a) => Some(&mut a.kafka),
        Command::Topic(TopicCommand::Create { kafka, .. }) => Some(kafka),
        Command::Gateway(a) => Some(&mut a.kafka),
        Command::Bench(a) => Some(&mut a.kafka),
        Command::Status(a) => Some(&mut a.kafka),
        Command::Migrate(_) | Command::Retention(_) | Command::Query(_) => None,
    }
}
