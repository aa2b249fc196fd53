//! CPU time of the parts on this machine, from /proc (Linux): the database server's processes,
//! the broker's, and the machine as a whole. The benchmark samples it around each run to show
//! how the work splits between job, database and broker, and how busy the cores were.

/// Cumulative CPU seconds at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuSample {
    /// Every `postgres` process, with the time of its children that have ended (a backend of
    /// a connection that closed counts in the postmaster's).
    pub database: f64,
    /// Every `nisshi` process (the local broker), likewise.
    pub broker: f64,
    /// All cores: time not idle, and all time.
    pub machine_busy: f64,
    pub machine_total: f64,
}

impl CpuSample {
    /// Reads /proc now; parts whose numbers cannot be read count zero.
    pub fn now() -> CpuSample {
        let mut sample = CpuSample::default();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
                if let Some((comm, seconds)) = process_seconds(&stat) {
                    match comm {
                        "postgres" => sample.database += seconds,
                        "nisshi" => sample.broker += seconds,
                        _ => {}
                    }
                }
            }
        }
        if let Some((busy, total)) = std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(machine_seconds) {
            (sample.machine_busy, sample.machine_total) = (busy, total);
        }
        sample
    }

    /// What was used between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuSample) -> CpuSample {
        CpuSample {
            database: (self.database - earlier.database).max(0.0),
            broker: (self.broker - earlier.broker).max(0.0),
            machine_busy: self.machine_busy - earlier.machine_busy,
            machine_total: self.machine_total - earlier.machine_total,
        }
    }

    /// The share of all cores that was busy (0 to 1).
    pub fn machine_utilisation(&self) -> f64 {
        if self.machine_total > 0.0 {
            self.machine_busy / self.machine_total
        } else {
            0.0
        }
    }
}

/// USER_HZ is 100 on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

/// (command name, user + system time of the process and of its waited-for children) from a
/// /proc/PID/stat line.
fn process_seconds(stat: &str) -> Option<(&str, f64)> {
    let comm = &stat[stat.find('(')? + 1..stat.rfind(')')?];
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks: f64 = (11..=14).map(|i| fields.get(i).and_then(|f| f.parse::<f64>().ok())).sum::<Option<f64>>()?;
    Some((comm, ticks / TICKS_PER_SECOND))
}

/// (busy, total) CPU seconds of all cores, from the first line of /proc/stat.
fn machine_seconds(stat: &str) -> Option<(f64, f64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<f64> = line.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0.0);
    Some(((total - idle) / TICKS_PER_SECOND, total / TICKS_PER_SECOND))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_counts_its_own_and_its_ended_childrens_time() {
        let stat = "123 (postgres) S 1 123 123 0 -1 4194560 100 0 0 0 250 50 700 300 20 0 1 0 5 0 0";
        assert_eq!(process_seconds(stat), Some(("postgres", 13.0)));
        // A command name with spaces and parentheses.
        let stat = "7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 100 0 0 0 20 0 1 0 5 0 0";
        assert_eq!(process_seconds(stat), Some(("a (b) c", 1.0)));
    }

    #[test]
    fn the_machine_is_busy_when_not_idle_or_waiting() {
        let stat = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\n";
        assert_eq!(machine_seconds(stat), Some((2.0, 10.0)));
        let d = CpuSample { machine_busy: 2.0, machine_total: 10.0, ..Default::default() };
        assert!((d.machine_utilisation() - 0.2).abs() < 1e-9);
    }

    #[test]
    fn this_machine_can_be_sampled() {
        let (a, b) = (CpuSample::now(), CpuSample::now());
        assert!(b.machine_total >= a.machine_total && a.machine_total > 0.0, "{a:?} {b:?}");
    }
}
