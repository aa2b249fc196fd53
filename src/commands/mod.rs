//! One file per subcommand: each takes its parsed flags, calls the library and prints what
//! the user asked for. `main.rs` parses, sets up and dispatches here.

mod bench;
mod check;
mod gateway;
mod loadgen;
mod migrate;
mod query;
mod retention;
mod run;
mod status;
mod topic;

use fleetflow::cli::Command;

/// Runs one subcommand to its end.
pub fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run::run(args),
        Command::Loadgen(args) => loadgen::run(args),
        Command::Topic(command) => topic::run(command),
        Command::Migrate(args) => migrate::run(args),
        Command::Gateway(args) => gateway::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Status(args) => status::run(args),
        Command::Check(args) => check::run(args),
        Command::Retention(args) => retention::run(args),
        Command::Query(args) => query::run(args),
    }
}

/// Writes a command's output to stdout. A reader that went away (`fleetflow query ... | head`)
/// ends the command quietly, as it does for other command-line tools.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => fleetflow::exit::Exit::Ok.end(),
        result => Ok(result?),
    }
}

/// The small runtime of the commands that ask the database or the broker a few questions.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}
