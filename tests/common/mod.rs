//! The integration-test harness: a real nisshi broker per test (fresh, on a free port), a
//! fresh database per test on the TimescaleDB server that `scripts/timescaledb.sh` runs, and
//! helpers to launch the job as several real processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use fleetflow::cli::{KafkaArgs, LoadgenArgs};
use fleetflow::report::RunSummary;

/// The repository root (where `scripts/` lives).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs one of the project's scripts and returns its trimmed stdout, panicking with its
/// output when it fails.
pub fn script(name: &str, args: &[&str], env: &[(&str, String)]) -> String {
    let out = Command::new("bash")
        .arg(repo().join("scripts").join(name))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{name}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `program` run under `prefix` (e.g. `ip netns exec HOST`), or directly when it is empty.
pub fn command_under(prefix: &[String], program: &std::ffi::OsStr) -> Command {
    match prefix.split_first() {
        Some((wrapper, args)) => {
            let mut command = Command::new(wrapper);
            command.args(args).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// A per-test directory for logs and broker state, kept after the test for inspection.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = repo().join("target").join("test-runs").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A nisshi broker, stopped when dropped: in-memory storage, or sqlite (durable across a
/// restart of the broker, for outage tests).
pub struct Broker {
    child: Option<Child>,
    pub addr: String,
    dir: PathBuf,
    sqlite: bool,
    /// A command the broker runs under (`ip netns exec HOST`: a host of its own).
    prefix: Vec<String>,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        Broker::launch(dir, false)
    }

    pub fn start_durable(dir: &Path) -> Broker {
        Broker::launch(dir, true)
    }

    fn launch(dir: &Path, sqlite: bool) -> Broker {
        let mut broker = Broker {
            child: None,
            addr: format!("127.0.0.1:{}", free_port()),
            dir: dir.to_owned(),
            sqlite,
            prefix: vec![],
        };
        broker.restart();
        broker
    }

    /// An in-memory broker listening on `addr`, run under `prefix` (e.g. in a network
    /// namespace of its own).
    pub fn start_under(dir: &Path, addr: &str, prefix: &[String]) -> Broker {
        let mut broker =
            Broker { child: None, addr: addr.to_owned(), dir: dir.to_owned(), sqlite: false, prefix: prefix.to_vec() };
        broker.restart();
        broker
    }

    /// Stops the broker (SIGKILL): clients see it vanish.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        let binary = script("broker.sh", &["path"], &[]);
        let url = format!("tcp://{}", self.addr);
        // nisshi resolves sqlite paths relative to its working directory.
        let storage = if self.sqlite { "sqlite://broker.db" } else { "memory://nisshi/" };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("broker.log")).unwrap();
        let child = command_under(&self.prefix, binary.as_ref())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", storage])
            .current_dir(&self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nisshi at {binary}: {e} (run scripts/broker.sh install)"));
        self.child = Some(child);
        wait_for_port(&self.addr, Duration::from_secs(20));
    }

    pub fn kafka(&self, topic: &str) -> KafkaArgs {
        KafkaArgs { brokers: self.addr.clone(), topic: topic.to_owned(), kafka_options: vec![] }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TimescaleDB server of the test's own (so it can be stopped and started), on a free
/// port, through the same script users run.
pub struct PrivateServer {
    env: Vec<(&'static str, String)>,
    pub url: String,
}

impl PrivateServer {
    pub fn start(dir: &Path) -> PrivateServer {
        let port = free_port().to_string();
        let env = vec![("FLEETFLOW_PG_PORT", port), ("FLEETFLOW_PG_DATA", dir.join("pgdata").display().to_string())];
        script("timescaledb.sh", &["up"], &env);
        let url = script("timescaledb.sh", &["url"], &env);
        PrivateServer { env, url }
    }

    pub fn stop(&self) {
        script("timescaledb.sh", &["down"], &self.env);
    }

    pub fn start_again(&self) {
        script("timescaledb.sh", &["up"], &self.env);
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/timescaledb.sh"))
            .arg("down")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output();
    }
}

pub fn wait_for_port(addr: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh database (with timescaledb available) on the shared test server. Dropped with the
/// test when it passes (a suite run makes about fifty, and runs of it filled a developer's
/// disk); kept for a look when it fails.
pub struct Database {
    pub url: String,
    pub name: String,
    server: String,
}

impl Drop for Database {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // Bounded: a test may have stopped the server (or its network) already.
        let _ = runtime().block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                let client = fleetflow::sink::connect(&self.server).await.ok()?;
                client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await.ok()
            })
            .await
        });
    }
}

impl Database {
    /// A fresh database on the shared test server.
    pub fn create(name: &str) -> Database {
        let server =
            std::env::var("FLEETFLOW_TEST_DATABASE_URL").unwrap_or_else(|_| script("timescaledb.sh", &["url"], &[]));
        Database::create_on(&server, name)
    }

    /// A fresh database on the server at `server` (a URL of any database there).
    pub fn create_on(server: &str, name: &str) -> Database {
        let name = format!("ff_{}_{}", name, std::process::id());
        runtime().block_on(async {
            let client =
                fleetflow::sink::connect(server).await.expect("test database server (scripts/timescaledb.sh up)");
            client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
            client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        });
        let url = match server.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("unexpected database URL {server}"),
        };
        Database { url, name, server: server.to_owned() }
    }

    /// Runs statements that return nothing.
    pub fn execute(&self, sql: &str) {
        runtime().block_on(async {
            let client = fleetflow::sink::connect(&self.url).await.unwrap();
            client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        })
    }

    /// Runs one query returning a single i64 (count, sum, ...).
    pub fn scalar(&self, sql: &str) -> i64 {
        runtime().block_on(async {
            let client = fleetflow::sink::connect(&self.url).await.unwrap();
            client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get::<_, i64>(0)
        })
    }

    /// Runs a query returning (i32, i64) pairs.
    pub fn pairs(&self, sql: &str) -> Vec<(i32, i64)> {
        runtime().block_on(async {
            let client = fleetflow::sink::connect(&self.url).await.unwrap();
            let rows = client.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        })
    }

    /// Rows in `metrics`, or 0 before the job created the table.
    pub fn metric_rows(&self) -> i64 {
        runtime().block_on(async {
            let client = fleetflow::sink::connect(&self.url).await.unwrap();
            match client.query_one("SELECT count(*) FROM metrics", &[]).await {
                Ok(row) => row.get(0),
                Err(_) => 0,
            }
        })
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A broker with a 4-partition topic and a fresh database.
pub struct Stack {
    pub dir: PathBuf,
    pub broker: Broker,
    pub db: Database,
    pub topic: String,
}

impl Stack {
    /// The backends of the job's database sessions (they carry the job's application name).
    pub fn job_sessions(&self) -> Vec<i32> {
        let tag = fleetflow::sink::fence::session_tag(&self.topic);
        self.db
            .pairs(&format!(
                "SELECT pid, 0::bigint FROM pg_stat_activity WHERE application_name = '{tag}' \
                 AND datname = current_database()"
            ))
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    }

    /// A fresh in-memory broker with the topic, and a fresh database on the shared server.
    pub fn start(name: &str, partitions: i32) -> Stack {
        let dir = test_dir(name);
        let broker = Broker::start(&dir);
        let db = Database::create(name);
        Stack::with(dir, broker, db, partitions)
    }

    /// A stack from parts (a durable broker, a private database server, ...).
    pub fn with(dir: PathBuf, broker: Broker, db: Database, partitions: i32) -> Stack {
        let topic = "metrics".to_owned();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(fleetflow::kafka::admin::create_topic(&broker.kafka(&topic).into(), partitions, 1)).unwrap();
        Stack { dir, broker, db, topic }
    }

    /// Loadgen settings for this stack: straight to Kafka, as fast as possible, 10 s interval.
    pub fn loadgen_args(&self, count: u64, servers: u32, seed: u64) -> LoadgenArgs {
        LoadgenArgs::straight_to_kafka(self.broker.kafka(&self.topic), servers, count, seed)
    }

    /// Produces `count` records from `servers` simulated servers, all acknowledged.
    pub fn produce(&self, count: u64, servers: u32, seed: u64, bad_fraction: f64) {
        let args = LoadgenArgs { bad_fraction, ..self.loadgen_args(count, servers, seed) };
        let report = fleetflow::loadgen::produce(&args, &AtomicBool::new(false)).unwrap();
        assert_eq!((report.delivered, report.failed), (count, 0), "not every record was acknowledged");
    }

    /// The end offset of every partition, from the broker.
    pub fn end_offsets(&self, partitions: i32) -> Vec<(i32, i64)> {
        (0..partitions)
            .map(|p| (p, fleetflow::kafka::admin::end_offset(&self.broker.kafka(&self.topic).into(), p).unwrap()))
            .collect()
    }

    /// Common arguments of `fleetflow run` against this stack.
    pub fn run_args(&self) -> Vec<String> {
        vec![
            "run".into(),
            "--brokers".into(),
            self.broker.addr.clone(),
            "--topic".into(),
            self.topic.clone(),
            "--database-url".into(),
            self.db.url.clone(),
        ]
    }
}

/// The job as `processes` processes of `workers` threads each.
pub struct Job {
    pub children: Vec<Child>,
    pub logs: Vec<PathBuf>,
    /// Each process's `--summary-json` file.
    pub summaries: Vec<PathBuf>,
}

impl Job {
    pub fn start(stack: &Stack, label: &str, processes: usize, workers: usize, extra: &[&str]) -> Job {
        let hosts: Vec<String> = (0..processes).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        Job::start_on(stack, label, &hosts, |_| Vec::new(), workers, extra)
    }

    /// One process per entry of `hosts` (its timely address), each run under `prefix(p)`
    /// (e.g. `ip netns exec HOST`, to put it on a host of its own; empty: run directly).
    pub fn start_on(
        stack: &Stack,
        label: &str,
        hosts: &[String],
        prefix: impl Fn(usize) -> Vec<String>,
        workers: usize,
        extra: &[&str],
    ) -> Job {
        let processes = hosts.len();
        let mut job = Job { children: vec![], logs: vec![], summaries: vec![] };
        for p in 0..processes {
            let log_path = stack.dir.join(format!("{label}-p{p}.log"));
            let log = std::fs::File::create(&log_path).unwrap();
            let summary = stack.dir.join(format!("{label}-p{p}.summary.json"));
            let _ = std::fs::remove_file(&summary);
            let mut cmd = command_under(&prefix(p), env!("CARGO_BIN_EXE_fleetflow").as_ref());
            cmd.args(stack.run_args())
                .args(["--workers", &workers.to_string(), "--processes", &processes.to_string()])
                .args(["--process-id", &p.to_string()])
                .arg("--summary-json")
                .arg(&summary)
                .args(extra)
                .env("FLEETFLOW_LOG", "info")
                .env("FLEETFLOW_REPORT_INTERVAL", "1s")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            if processes > 1 {
                cmd.args(["--hosts", &hosts.join(",")]);
            }
            job.children.push(cmd.spawn().unwrap());
            job.logs.push(log_path);
            job.summaries.push(summary);
        }
        job
    }

    /// Process `index`'s run summary as it last wrote it: rewritten every report interval
    /// (1 s here) while it runs, with `finished` and its exit code once it has ended. Panics
    /// (showing the logs) when there is none yet.
    pub fn summary(&self, index: usize) -> RunSummary {
        RunSummary::read(&self.summaries[index]).unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()))
    }

    /// Waits for every process to exit; panics (showing the logs) after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Vec<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut statuses = vec![None; self.children.len()];
        while statuses.iter().any(Option::is_none) {
            for (i, child) in self.children.iter_mut().enumerate() {
                if statuses[i].is_none() {
                    statuses[i] = child.try_wait().unwrap();
                }
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("job did not finish within {timeout:?}\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        statuses.into_iter().map(Option::unwrap).collect()
    }

    /// Waits and asserts every process exited 0, leaving a final summary that says so.
    pub fn wait_success(&mut self, timeout: Duration) {
        let statuses = self.wait(timeout);
        assert!(statuses.iter().all(ExitStatus::success), "job failed: {statuses:?}\n{}", self.log_tail());
        for index in 0..self.children.len() {
            let summary = self.summary(index);
            assert!(summary.finished && summary.exit_code == Some(0), "process {index}: {summary:?}");
        }
    }

    pub fn signal(&self, signal: &str) {
        for child in &self.children {
            let _ = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status();
        }
    }

    pub fn kill(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of every process's log.
    pub fn log_tail(&self) -> String {
        self.logs
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!("== {} ==\n{}", p.display(), lines[lines.len().saturating_sub(30)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn log_text(&self) -> String {
        self.logs.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asserts the promise: exactly `expected` rows, no (server, time) or (partition, offset)
/// twice, and the committed offsets at the end of every partition.
pub fn assert_exactly_once(stack: &Stack, expected: i64, partitions: i32) {
    let db = &stack.db;
    assert_eq!(db.scalar("SELECT count(*) FROM metrics"), expected, "row count");
    assert_eq!(
        db.scalar("SELECT count(*) FROM (SELECT DISTINCT server_id, time FROM metrics) d"),
        expected,
        "duplicate (server_id, time)"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM metrics) d"),
        expected,
        "duplicate (partition, offset)"
    );
    let committed = db.pairs("SELECT partition, next_offset FROM fleetflow_offsets ORDER BY partition");
    assert_eq!(committed, stack.end_offsets(partitions), "committed offsets are the partitions' end offsets");
}

impl Job {
    /// SIGKILLs process `index` (a crash), then gives the others `grace` to notice and exit
    /// on their own before killing them too. Returns how many exited on their own.
    pub fn crash(&mut self, index: usize, grace: Duration) -> usize {
        let _ = self.children[index].kill();
        let _ = self.children[index].wait();
        let deadline = Instant::now() + grace;
        let mut exited = 0;
        for (i, child) in self.children.iter_mut().enumerate() {
            if i == index {
                continue;
            }
            loop {
                if child.try_wait().unwrap().is_some() {
                    exited += 1;
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        exited
    }
}

impl Stack {
    /// Produces `count` records in a background thread at `rate` records/s.
    pub fn produce_in_background(&self, count: u64, servers: u32, seed: u64, rate: f64) -> std::thread::JoinHandle<()> {
        let args = LoadgenArgs { rate: Some(rate), ..self.loadgen_args(count, servers, seed) };
        std::thread::spawn(move || {
            let report = fleetflow::loadgen::produce(&args, &AtomicBool::new(false)).unwrap();
            assert_eq!((report.delivered, report.failed), (count, 0), "not every record was acknowledged");
        })
    }

    /// Waits until `metrics` holds at least `rows` rows.
    pub fn wait_for_rows(&self, rows: i64, timeout: Duration, job: &mut Job) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            for child in &mut job.children {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("a job process exited ({status}) before {rows} rows were written\n{}", job.log_tail());
                }
            }
            let n = self.db.metric_rows();
            if n >= rows {
                return n;
            }
            assert!(Instant::now() < deadline, "only {n} of {rows} rows after {timeout:?}\n{}", job.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A `fleetflow gateway` process in front of a broker, stopped when dropped.
pub struct Gateway {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl Gateway {
    pub fn start(stack: &Stack, extra: &[&str]) -> Gateway {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = stack.dir.join(format!("gateway-{}.log", addr.replace(':', "_")));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fleetflow"))
            .args(["gateway", "--listen", &addr, "--brokers", &stack.broker.addr, "--topic", &stack.topic])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        wait_for_port(&addr, Duration::from_secs(20));
        Gateway { child, url: format!("http://{addr}"), log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Messages in the topic: the sum of the partitions' end offsets.
pub fn messages_in_topic(stack: &Stack, partitions: i32) -> i64 {
    stack.end_offsets(partitions).iter().map(|(_, end)| end).sum()
}

/// A real Prometheus Alertmanager (Debian's `prometheus-alertmanager`), stopped when dropped.
pub struct Alertmanager {
    child: Child,
    pub url: String,
}

impl Alertmanager {
    pub fn start(dir: &Path) -> Alertmanager {
        let binary = "/usr/bin/prometheus-alertmanager";
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: scripts/prereqs.sh installs Debian's prometheus-alertmanager"
        );
        let config = dir.join("alertmanager.yml");
        std::fs::write(&config, "route:\n  receiver: none\n  group_wait: 1s\nreceivers:\n  - name: none\n").unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("alertmanager.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("alertmanager-data").display()))
            .arg(format!("--web.listen-address={addr}"))
            // A single instance: no gossip port to collide with other tests.
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for_port(&addr, Duration::from_secs(20));
        Alertmanager { child, url: format!("http://{addr}") }
    }

    /// The alerts its v2 API shows (active ones: resolved alerts are not listed).
    pub fn alerts(&self) -> Vec<serde_json::Value> {
        let url = format!("{}/api/v2/alerts", self.url);
        let body = runtime().block_on(async { reqwest::get(&url).await?.text().await }).unwrap();
        serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
