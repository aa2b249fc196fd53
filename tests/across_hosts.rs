//! The job runs as 3 processes on 3 hosts, with the broker and the database on hosts of their
//! own, and a host's process killed mid-stream loses and repeats nothing once the job is
//! started again.
//!
//! The hosts are network namespaces this test makes (root only), joined by a bridge on a
//! private subnet; traffic goes only between them and the test, which sits on the bridge.
//! Everything is removed at the end, also when the test fails.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, Broker, Database, Job, Stack};

/// Runs `ip` with `args`, panicking with its words when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("the ip command (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Hosts on a bridge: each a network namespace with one address. The test's own namespace
/// gets `.1` on the bridge, so it reaches every host.
struct Hosts {
    bridge: String,
    names: Vec<String>,
    subnet: String,
    /// The database server's data directory and environment, to stop it at the end.
    database: Option<Vec<(&'static str, String)>>,
}

impl Hosts {
    fn create(roles: &[&str]) -> Hosts {
        let tag = std::process::id() % 100_000;
        let subnet = format!("10.231.{}", 20 + std::process::id() % 200);
        let bridge = format!("ffb{tag}");
        let mut hosts = Hosts { bridge: bridge.clone(), names: vec![], subnet: subnet.clone(), database: None };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for (i, role) in roles.iter().enumerate() {
            let name = format!("ff{tag}-{role}");
            let (outside, inside) = (format!("ffv{tag}h{i}"), format!("ffv{tag}n{i}"));
            ip(&["netns", "add", &name]);
            hosts.names.push(name.clone());
            ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside]);
            ip(&["link", "set", &outside, "master", &bridge, "up"]);
            ip(&["link", "set", &inside, "netns", &name]);
            let address = format!("{}/24", hosts.address(i));
            ip(&["-n", &name, "addr", "add", &address, "dev", &inside]);
            ip(&["-n", &name, "link", "set", &inside, "up"]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// Host `i`'s address.
    fn address(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 10 + i)
    }

    /// The command prefix that runs a program on host `i`.
    fn on(&self, i: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.names[i].clone()]
    }

    /// Starts a TimescaleDB server on host `i` (through the users' script); returns its URL.
    fn start_database(&mut self, i: usize, dir: &Path) -> String {
        let env = vec![
            ("FLEETFLOW_PG_PORT", "5432".to_owned()),
            ("FLEETFLOW_PG_DATA", dir.join("pgdata").display().to_string()),
            ("FLEETFLOW_PG_LISTEN", self.address(i)),
        ];
        self.database = Some(env.clone());
        let prefix = self.on(i);
        let out = Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["bash", &common::repo().join("scripts/timescaledb.sh").display().to_string(), "up"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        assert!(out.status.success(), "database on host {i}: {}", String::from_utf8_lossy(&out.stderr));
        format!("postgres://postgres@{}:5432/postgres", self.address(i))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if let Some(env) = &self.database {
            let _ = Command::new("bash")
                .arg(common::repo().join("scripts/timescaledb.sh"))
                .arg("down")
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for name in &self.names {
            // Whatever still runs on the host ends with it.
            let _ = Command::new("ip").args(["netns", "pids", name]).output().map(|out| {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// The job as one process per host `hosts[0..3]`, one worker each.
fn start_job(stack: &Stack, hosts: &Hosts, label: &str, extra: &[&str]) -> Job {
    let port = free_port();
    let addresses: Vec<String> = (0..3).map(|p| format!("{}:{port}", hosts.address(p))).collect();
    Job::start_on(stack, label, &addresses, |p| hosts.on(p), 1, extra)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[test]
fn three_processes_on_three_hosts_lose_and_repeat_nothing_when_one_host_s_process_is_killed() {
    if !is_root() {
        eprintln!("across_hosts: not root, cannot make network namespaces; not run");
        return;
    }
    let dir = common::test_dir("across_hosts");
    // Hosts 0-2: the job; 3: the broker; 4: the database.
    let mut hosts = Hosts::create(&["job0", "job1", "job2", "broker", "db"]);
    let broker = Broker::start_under(&dir, &format!("{}:9092", hosts.address(3)), &hosts.on(3));
    let server = hosts.start_database(4, &dir);
    let db = Database::create_on(&server, "across_hosts");
    let partitions = 6;
    let stack = Stack::with(dir, broker, db, partitions);
    let records = 60_000;
    stack.produce(records as u64, 600, 13, 0.0);

    // Slowed down, so the kill lands mid-stream.
    let throttle = ["--epoch-records", "500", "--max-epochs-in-flight", "2"];
    let mut first = start_job(&stack, &hosts, "first", &throttle);
    let written = stack.wait_for_rows(15_000, Duration::from_secs(180), &mut first);
    assert!(written < records, "the kill must land mid-stream ({written} rows already)");
    let stopped_on_their_own = first.crash(1, Duration::from_secs(30));
    assert_eq!(stopped_on_their_own, 2, "the other hosts' processes noticed the loss\n{}", first.log_tail());
    for (i, child) in first.children.iter_mut().enumerate().filter(|(i, _)| *i != 1) {
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(3), "process {i}: exit code 3, a peer was lost\n{}", first.log_tail());
    }

    // A process that ended mid-commit leaves its database session to finish the commit: what
    // was written before the restart is known once the first job's sessions are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !stack.job_sessions().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the first job's database sessions did not end within a minute");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before_restart = stack.db.metric_rows();
    let mut second = start_job(&stack, &hosts, "second", &["--exit-when-idle", "2s"]);
    second.wait_success(Duration::from_secs(180));
    common::assert_exactly_once(&stack, records, partitions);
    let written_second: u64 = (0..3).map(|p| second.summary(p).rows_written).sum();
    assert_eq!(written_second, (records - before_restart) as u64, "the restart wrote exactly what was missing");
    let replayed: u64 = (0..3).map(|p| second.summary(p).replayed_skipped).sum();
    println!("rows before the kill: {before_restart}; written after the restart: {written_second}; replayed and skipped: {replayed}");
    drop(second);
    drop(first);
    drop(stack);
    drop(hosts);
}
