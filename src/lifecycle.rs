//! The life of a job process around its work: shutdown signals and the flag every worker
//! watches, the shutdown and connect watchdogs, and the panic hook. How the process ends
//! (exit codes, last words) is `exit`'s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::exit::{exit_with, Exit};

/// How often the watchdogs look at their flag.
const TICK: Duration = Duration::from_millis(50);

/// The process's shutdown: requested by SIGINT/SIGTERM (or by the code), watched by every
/// worker. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    requested: Arc<AtomicBool>,
}

impl Shutdown {
    /// A shutdown nothing has requested yet, and no signal will.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A shutdown that SIGINT and SIGTERM request.
    pub fn on_signals() -> std::io::Result<Shutdown> {
        let shutdown = Shutdown::new();
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, shutdown.requested.clone())?;
        }
        Ok(shutdown)
    }

    /// Like [`Shutdown::on_signals`], and a second signal while shutting down ends the process
    /// at once, with [`Exit::Error`]'s code and no line: inside the signal handler, so without
    /// the last words (see `exit`).
    pub fn on_signals_second_exits() -> std::io::Result<Shutdown> {
        let shutdown = Shutdown::new();
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            // Registered first, so it sees the flag as the first signal left it.
            signal_hook::flag::register_conditional_shutdown(signal, Exit::Error.code(), shutdown.requested.clone())?;
            signal_hook::flag::register(signal, shutdown.requested.clone())?;
        }
        Ok(shutdown)
    }

    /// Asks for the shutdown.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Relaxed);
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// The flag itself, for code that takes one (the workers' context, the loadgen).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.requested.clone()
    }

    /// Once the shutdown is requested, gives the workers `timeout` to make their open epochs
    /// durable, then ends the process anyway ([`Exit::Ok`]): what was not committed is read
    /// again on the next start.
    pub fn spawn_watchdog(&self, timeout: Duration) {
        let shutdown = self.clone();
        std::thread::spawn(move || {
            while !shutdown.is_requested() {
                std::thread::sleep(TICK);
            }
            tracing::info!(timeout = ?timeout, "shutting down: finishing the open epochs");
            std::thread::sleep(timeout);
            tracing::warn!(
                "shutdown timed out; abandoning epochs that are not durable (they will be re-read on restart)"
            );
            Exit::Ok.end()
        });
    }
}

/// Until the other processes of a job connect, timely waits for them without end; this
/// watches that wait.
#[derive(Debug)]
pub struct ConnectWatchdog {
    connected: Arc<AtomicBool>,
}

impl ConnectWatchdog {
    /// With several processes and a non-zero `timeout`: a process whose peers do not connect
    /// within `timeout` (a wrong host list, a process not started) says so and exits
    /// ([`Exit::LostPeer`]) instead of waiting for ever. Otherwise it watches nothing.
    pub fn start(processes: usize, timeout: Duration) -> ConnectWatchdog {
        let connected = Arc::new(AtomicBool::new(false));
        if processes > 1 && !timeout.is_zero() {
            let connected = connected.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + timeout;
                while !connected.load(Ordering::Relaxed) && Instant::now() < deadline {
                    std::thread::sleep(TICK);
                }
                if !connected.load(Ordering::Relaxed) {
                    exit_with(
                        Exit::LostPeer,
                        &format!(
                            "the other processes of the job did not connect within {}; start every process with \
                             the same --hosts/--hostfile, --processes and --workers, each with its own --process-id",
                            humantime::format_duration(timeout)
                        ),
                    );
                }
            });
        }
        ConnectWatchdog { connected }
    }

    /// Every process of the job is connected: the watchdog stands down.
    pub fn connected(&self) {
        self.connected.store(true, Ordering::Relaxed);
    }
}

/// Turns a panic into one line and an exit. The usual one: another process of the job died,
/// and timely's network threads panic on the broken connection ([`Exit::LostPeer`]). Nothing
/// is lost (what was not committed is read again); the whole job has to be restarted. Any
/// other panic is a bug ([`Exit::Internal`]).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        // The network threads panic with this message; the worker threads, which may notice
        // first, panic inside timely's communication crate with a less telling one.
        let in_communication = info.location().is_some_and(|l| l.file().contains("timely_communication"));
        if message.contains("timely communication error") || in_communication {
            exit_with(
                Exit::LostPeer,
                &format!(
                    "lost the connection to another process of the job ({message}); stopping. Restart every \
                     process of the job: uncommitted records are read again, nothing is lost."
                ),
            );
        }
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        exit_with(
            Exit::Internal,
            &format!("internal error in thread {thread}: {message}{location}; stopping (please report this)"),
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shutdown_is_shared_by_its_clones_and_its_flag() {
        let shutdown = Shutdown::new();
        let flag = shutdown.flag();
        let clone = shutdown.clone();
        assert!(!clone.is_requested());
        shutdown.request();
        assert!(clone.is_requested() && flag.load(Ordering::Relaxed));
    }
}
