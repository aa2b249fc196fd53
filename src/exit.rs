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
//! Each of them first runs the process's last words, if it set some with [`on_exit`] (the job
//! writes its final `--summary-json`). The one exit that cannot: a second SIGINT/SIGTERM
//! during a shutdown ends the process inside the signal handler with [`Exit::Error`]'s code
//! (see `lifecycle`).

use std::process::ExitCode;
use std::sync::{Mutex, Once};

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

    /// Ends the process at once with this code and no line (after the last words).
    pub fn end(self) -> ! {
        last_words(self);
        std::process::exit(self.code())
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// What `main` returns for a command's result: `Ok` is [`Exit::Ok`], an error is one line on
/// stderr (the error and its causes, see [`crate::one_line`]) and [`Exit::Error`], or
/// [`Exit::Usage`] when the configuration was wrong.
pub fn from_result(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => {
            last_words(Exit::Ok);
            Exit::Ok.into()
        }
        Err(e) if e.is::<crate::config::ConfigError>() => fail(Exit::Usage, &crate::one_line(&e)),
        Err(e) => fail(Exit::Error, &crate::one_line(&e)),
    }
}

/// One line on stderr and the exit code for `main` to return.
pub fn fail(exit: Exit, line: &str) -> ExitCode {
    last_words(exit);
    eprintln!("fleetflow: {line}");
    exit.into()
}

/// Ends the process at once with one line on stderr. For errors found on a background task
/// (a writer, the committer, the fence keeper) or a worker that no other worker can recover
/// from: unwinding the dataflow would only wait on peers that cannot finish either. Nothing
/// is lost: what was not committed is read again on the next start.
pub fn exit_with(exit: Exit, line: &str) -> ! {
    // Before the lock below: last words that panic come back here through the panic hook.
    last_words(exit);
    // Several workers often fail the same way at once: the first one speaks for the process.
    static EXITING: Mutex<()> = Mutex::new(());
    let _only_one = EXITING.lock();
    eprintln!("fleetflow: {line}");
    std::process::exit(exit.code())
}

type LastWords = Box<dyn FnOnce(Exit) + Send>;

static LAST_WORDS: Mutex<Option<LastWords>> = Mutex::new(None);

/// Sets what the process does right before it ends through this module, given the exit
/// code; it replaces any earlier one, and the first exit runs it (once). Keep it short and
/// wait on no lock a failing thread may hold: it can run on any thread, the panic hook's
/// included.
pub fn on_exit(words: impl FnOnce(Exit) + Send + 'static) {
    let mut slot = LAST_WORDS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    *slot = Some(Box::new(words));
}

fn last_words(exit: Exit) {
    thread_local! {
        static SAYING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    // This thread is saying them already: they panicked, and the panic hook is ending the
    // process.
    if SAYING.with(|saying| saying.replace(true)) {
        return;
    }
    // The first exit says them; an exit on another thread meanwhile waits until they are said.
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let words = LAST_WORDS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(words) = words {
            words(exit);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_words_run_once_with_the_exit_code() {
        let said = std::sync::Arc::new(Mutex::new(Vec::new()));
        let record = said.clone();
        on_exit(move |exit| record.lock().unwrap().push(exit));
        last_words(Exit::Fenced);
        last_words(Exit::Ok);
        assert_eq!(*said.lock().unwrap(), vec![Exit::Fenced]);
    }
}
