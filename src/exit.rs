//! How a fleetflow process ends: every exit code in one place, so scripts and operators can
//! rely on them (the README lists them).

/// A process's exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Done; or a shutdown that gave up waiting (what was not durable is read again).
    Ok = 0,
    /// An error the user can act on, named in one line.
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
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit as u8)
    }
}

/// Ends the process at once with one line on stderr. For errors found on a background task
/// (a writer, the committer, the fence keeper) or a worker that no other worker can recover
/// from: unwinding the dataflow would only wait on peers that cannot finish either. Nothing
/// is lost: what was not committed is read again on the next start.
pub fn exit_with(exit: Exit, line: &str) -> ! {
    // Several workers often fail the same way at once: the first one speaks for the process.
    static EXITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _only_one = EXITING.lock();
    eprintln!("fleetflow: {line}");
    std::process::exit(exit.code())
}
