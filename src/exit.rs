//! How a fleetflow process ends: every exit code in one place, so scripts and operators can
//! rely on them (the README lists them), and every way of ending goes through here:
//!
//! - [`from_result`]: `main` returns a command's result (an error is one line on stderr);
//! - [`fail`]: `main` stops before a command ran (a wrong flag, an unreadable config file);
//! - [`exit_with`]: a thread ends the process at once with one line (a worker, a writer, a
//!   watchdog, the panic hook);
//! - [`Exit::end`]: the process ends at once, saying nothing (a shutdown that gave up
//!   waiting, a reader of our output that went away).
//!
//! The one exit that cannot go through here: a second SIGINT/SIGTERM during a shutdown ends
//! the process inside the signal handler, with [`Exit::Error`]'s code (see `lifecycle`).

use std::process::ExitCode;
use std::sync::Mutex;

/// A process's exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Done; or a shutdown that gave up waiting (what was not durable is read again).
    Ok = 0,
    /// An error the user can act on, named in one line; or a second shutdown signal, which
    /// ends the process at once.
    Error = 1,
    /// A wrong flag or argument.
    Usage = 2,
    /// Another process of the job was lost (or never connected): restart every process.
    LostPeer = 3,
    /// Another copy of the job holds the topic (see `sink::fence`).
    Fenced = 4,
    /// A bug: please report it.
    Internal = 101,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// Ends the process at once with this code and no line.
    pub fn end(self) -> ! {
        std::process::exit(self.code())
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// What `main` returns for a command's result: `Ok` is [`Exit::Ok`], an error is one line on
/// stderr (the error and its causes, see [`crate::one_line`]) and [`Exit::Error`].
pub fn from_result(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => Exit::Ok.into(),
        Err(e) => fail(Exit::Error, &crate::one_line(&e)),
    }
}

/// One line on stderr and the exit code for `main` to return.
pub fn fail(exit: Exit, line: &str) -> ExitCode {
    eprintln!("fleetflow: {line}");
    exit.into()
}

/// Ends the process at once with one line on stderr. For errors found on a background task
/// (a writer, the committer, the fence keeper) or a worker that no other worker can recover
/// from: unwinding the dataflow would only wait on peers that cannot finish either. Nothing
/// is lost: what was not committed is read again on the next start.
pub fn exit_with(exit: Exit, line: &str) -> ! {
    // Several workers often fail the same way at once: the first one speaks for the process.
    static EXITING: Mutex<()> = Mutex::new(());
    let _only_one = EXITING.lock();
    eprintln!("fleetflow: {line}");
    std::process::exit(exit.code())
}
