//! The `fleetflow` binary: read the config file, parse the command line, set up logging,
//! dispatch to the command (one file each under `commands/`), and end with the command's
//! exit code (`fleetflow::exit`): an error is one line on stderr.

mod commands;

use std::process::ExitCode;

use clap::Parser;
use fleetflow::alerts::rules::AlertRules;
use fleetflow::cli::{Cli, Command, TopicCommand};
use fleetflow::exit::{self, Exit};

fn main() -> ExitCode {
    bound_malloc();
    let (kafka_from_file, alert_rules) = match load_config_file() {
        Ok(file) => file,
        Err(e) => return exit::fail(Exit::Usage, &e.to_string()),
    };
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return Exit::Ok.into();
        }
        Err(e) => return exit::fail(Exit::Usage, &usage_line(&e)),
    };
    if let Some(kafka) = kafka_args(&mut cli.command) {
        // File settings first, so the user's -X flags override them.
        let flags = std::mem::take(&mut kafka.kafka_options);
        kafka.kafka_options = kafka_from_file.into_iter().chain(flags).collect();
    }
    if let Command::Run(args) | Command::Check(args) = &mut cli.command {
        args.alert_rules = alert_rules;
    }
    init_logging();
    exit::from_result(commands::dispatch(cli.command))
}

/// Bounds glibc malloc's memory before any thread starts, unless the user set the same knobs
/// through glibc's own environment variables.
///
/// - At most 2 arenas (glibc's default is 8 per core): a thread that allocates while another
///   holds an arena gets one of its own, and the timely workers, librdkafka's and tokio's
///   threads each kept free memory of their own.
/// - Blocks of 256 KiB and more (fetch responses, COPY buffers, epochs' vectors) are mapped
///   and unmapped on their own: glibc's threshold otherwise rises to 32 MiB after the first
///   large free, and such buffers then stay in the arenas.
///
/// Drains of 1M records, old and new binary interleaved: peak RSS 1x2 137-147 -> 117-120 MiB,
/// 1x1 93-97 -> 84-85 MiB; the job's CPU within this machine's noise (it takes twice the page
/// faults). One arena alone gave 107-111 MiB for 1x2 but 8-10% more CPU.
fn bound_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (param, value, env) in
        [(libc::M_ARENA_MAX, 2, "MALLOC_ARENA_MAX"), (libc::M_MMAP_THRESHOLD, 256 * 1024, "MALLOC_MMAP_THRESHOLD_")]
    {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only changes allocator settings; it is called before any other
            // thread exists, and a refused setting (return 0) leaves glibc's default.
            unsafe { libc::mallopt(param, value) };
        }
    }
}

/// clap's error as one line naming what to fix.
fn usage_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut first = lines.next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_owned();
    // "the following required arguments were not provided:" names them on the next line.
    if first.ends_with(':') {
        first = format!("{first} {}", lines.next().unwrap_or_default());
    }
    format!("{first} (see --help)")
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

/// Reads `--config FILE` (or FLEETFLOW_CONFIG) before the flags are parsed: each key becomes
/// the default of its FLEETFLOW_* variable unless that is set, so flags > env > file >
/// defaults. Returns the file's `[kafka]` settings and `[[alert]]` rules.
fn load_config_file() -> Result<(Vec<(String, String)>, AlertRules), fleetflow::config::ConfigError> {
    let args: Vec<String> = std::env::args().collect();
    let from_flag = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=")
            .map(str::to_owned)
            .or_else(|| (a == "--config").then(|| args.get(i + 1).cloned()).flatten())
    });
    let Some(path) = from_flag.or_else(|| std::env::var("FLEETFLOW_CONFIG").ok()) else {
        return Ok(Default::default());
    };
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
    Ok((file.kafka, file.alert_rules))
}

/// The Kafka flags of a command that has them, where the config file's `[kafka]` settings go.
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
