//! The gateway on an open network (issue 11): tokens and tenants, gzip bodies and bombs,
//! per-request limits with replies that say what became of each record, slow clients,
//! a bounded shutdown, TLS, and Telegraf's documented output landing series by series.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{messages_in_topic, Gateway, Job, Stack};
use serde_json::Value;

struct Reply {
    status: u16,
    body: Value,
}

fn send(url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Reply {
    common::runtime().block_on(async {
        let mut request = reqwest::Client::new().post(url).body(body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap();
        Reply { status, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
    })
}

fn record(server: &str) -> String {
    format!(r#"{{"serverId":"{server}","cpu":1,"ram":2,"ts":{}}}"#, fleetflow::record::now_ms() - 1000)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

const BEARER: (&str, &str) = ("authorization", "Bearer s3cret");

#[test]
fn tokens_tenants_gzip_and_per_request_limits() {
    let stack = Stack::start("gateway_open", 2);
    let tokens = "s3cret,acme-token acme-";
    let gw = Gateway::start(
        &stack,
        &[
            "--tokens",
            tokens,
            "--max-records",
            "50",
            "--max-in-flight",
            "20",
            "--max-decompressed-bytes",
            "100000",
            "--max-rejection-details",
            "3",
        ],
    );
    let api = format!("{}/v1/metrics", gw.url);
    let mut acknowledged = 0;

    // No token, a wrong one, another scheme: 401, nothing produced.
    let r = send(&api, record("a").into(), &[]);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(send(&api, record("a").into(), &[("authorization", "Bearer nope")]).status, 401);
    assert_eq!(send(&api, record("a").into(), &[("authorization", "Basic czNjcmV0")]).status, 401);
    // Both schemes.
    assert_eq!(send(&api, record("a").into(), &[BEARER]).status, 202);
    assert_eq!(send(&api, record("b").into(), &[("authorization", "Token s3cret")]).status, 202);
    acknowledged += 2;

    // A tenant's token: its own servers yes, another tenant's no (and then none of the request).
    let acme = ("authorization", "Bearer acme-token");
    assert_eq!(send(&api, record("acme-1").into(), &[acme]).status, 202);
    acknowledged += 1;
    let r = send(&api, format!("{}\n{}", record("acme-2"), record("globex-1")).into(), &[acme]);
    assert_eq!((r.status, r.body["accepted"].as_u64()), (403, Some(0)), "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("globex-1"), "{}", r.body);

    // gzip bodies, as Telegraf sends them.
    let body = (0..10).map(|i| record(&format!("z{i}"))).collect::<Vec<_>>().join("\n");
    let r = send(&api, gzip(body.as_bytes()), &[BEARER, ("content-encoding", "gzip")]);
    assert_eq!((r.status, r.body["accepted"].as_u64()), (202, Some(10)), "{}", r.body);
    acknowledged += 10;
    // A gzip bomb: 413 naming the limit, not an out-of-memory.
    let bomb = gzip(&vec![b' '; 20 * 1024 * 1024]);
    assert!(bomb.len() < 100_000);
    let r = send(&api, bomb, &[BEARER, ("content-encoding", "gzip")]);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("--max-decompressed-bytes"), "{}", r.body);
    let r = send(&api, b"not gzip".to_vec(), &[BEARER, ("content-encoding", "gzip")]);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(send(&api, record("a").into(), &[BEARER, ("content-encoding", "br")]).status, 415);

    // More records than --max-records: 413 naming the limit; the issue's 4 MiB of `1\n` too.
    let many = (0..51).map(|i| record(&format!("m{i}"))).collect::<Vec<_>>().join("\n");
    let r = send(&api, many.into(), &[BEARER]);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("more than 50 records"), "{}", r.body);
    let r = send(&api, "1\n".repeat(2_000_000).into(), &[BEARER]);
    assert_eq!(r.status, 413, "{}", r.body);
    let r = send(&format!("{}/api/v2/write", gw.url), "m,host=h x=1\n".repeat(51).into(), &[BEARER]);
    assert_eq!(r.status, 413, "{}", r.body);

    // More valid records than --max-in-flight: refused with 413 (split it), not 503 for ever.
    let wide = (0..30).map(|i| record(&format!("w{i}"))).collect::<Vec<_>>().join("\n");
    let r = send(&api, wide.into(), &[BEARER]);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("--max-in-flight"), "{}", r.body);

    // Rejections: the first 3 with their reason, all counted by reason.
    let mut lines: Vec<String> = (0..40).map(|_| r#"{"serverId":"","cpu":1}"#.to_owned()).collect();
    lines.extend((0..5).map(|_| "{bad".to_owned()));
    lines.push(record("ok1"));
    let r = send(&api, lines.join("\n").into(), &[BEARER]);
    assert_eq!((r.status, r.body["accepted"].as_u64()), (400, Some(1)), "{}", r.body);
    assert_eq!(r.body["rejected"].as_array().unwrap().len(), 3, "{}", r.body);
    assert_eq!(r.body["rejected_count"], 45, "{}", r.body);
    assert_eq!(r.body["rejected_by_reason"]["empty_server_id"], 40, "{}", r.body);
    assert_eq!(r.body["rejected_by_reason"]["malformed_json"], 5, "{}", r.body);
    acknowledged += 1;

    // A record without a time is stamped at the gateway (so a retry is the same row).
    let r = send(&api, br#"{"serverId":"nots","cpu":3}"#.to_vec(), &[BEARER]);
    assert_eq!((r.status, r.body["accepted"].as_u64()), (202, Some(1)), "{}", r.body);
    acknowledged += 1;

    // Health and metrics need no token.
    let (health, metrics) = common::runtime().block_on(async {
        let c = reqwest::Client::new();
        let h = c.get(format!("{}/healthz", gw.url)).send().await.unwrap().status().as_u16();
        let m = c.get(format!("{}/metrics", gw.url)).send().await.unwrap().text().await.unwrap();
        (h, m)
    });
    assert_eq!(health, 200);
    assert!(
        metrics.contains(&format!("fleetflow_gateway_records_total{{outcome=\"accepted\"}} {acknowledged}")),
        "{metrics}"
    );
    assert_eq!(messages_in_topic(&stack, 2), acknowledged as i64);
}

/// Reads until the server closes the connection (or 60 s, a guard against hanging).
fn read_until_closed(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("the gateway kept a slow client's connection open")
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

fn connect(url: &str) -> TcpStream {
    TcpStream::connect(url.trim_start_matches("http://")).unwrap()
}

#[test]
fn slow_clients_time_out_while_a_good_client_is_served() {
    let stack = Stack::start("gateway_slow", 2);
    let gw = Gateway::start(&stack, &["--header-timeout", "1s", "--body-timeout", "1s", "--max-connections", "4"]);
    let api = format!("{}/v1/metrics", gw.url);
    // Half a request line, and headers then part of the body.
    let mut half_line = connect(&gw.url);
    half_line.write_all(b"POST /v1/met").unwrap();
    let mut half_body = connect(&gw.url);
    half_body.write_all(b"POST /v1/metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"serverId\":").unwrap();
    // A good client is served meanwhile.
    let r = send(&api, record("good").into(), &[]);
    assert_eq!(r.status, 202, "{}", r.body);
    // The slow ones are cut off: the body one with a 408.
    read_until_closed(&mut half_line);
    let reply = read_until_closed(&mut half_body);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    // The connection cap: slots come back, so more clients than the cap are served in turn.
    for i in 0..8 {
        assert_eq!(send(&api, record(&format!("g{i}")).into(), &[]).status, 202);
    }
    assert_eq!(messages_in_topic(&stack, 2), 9);
}

#[test]
fn sigterm_with_a_slow_client_still_exits_within_the_shutdown_timeout() {
    let stack = Stack::start("gateway_slow_stop", 2);
    // The slow client's own timeouts (120 s) are far beyond the shutdown timeout (2 s).
    let mut gw =
        Gateway::start(&stack, &["--header-timeout", "120s", "--body-timeout", "120s", "--shutdown-timeout", "2s"]);
    assert_eq!(send(&format!("{}/v1/metrics", gw.url), record("s1").into(), &[]).status, 202);
    let mut slow = connect(&gw.url);
    slow.write_all(b"POST /v1/metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::process::Command::new("kill").args(["-TERM", &gw.child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the gateway waited for its slow client\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "gateway exit {status}\n{}", gw.log_text());
    assert!(gw.log_text().contains("flushing the producer"), "{}", gw.log_text());
    assert_eq!(messages_in_topic(&stack, 2), 1);
    drop(slow);
}

#[test]
fn tls_round_trip() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;

    let stack = Stack::start("gateway_tls", 2);
    let (cert, key) = (stack.dir.join("cert.pem"), stack.dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let gw = Gateway::start(
        &stack,
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap(), "--tokens", "s3cret"],
    );
    let addr = gw.url.trim_start_matches("http://").to_owned();

    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(&cert).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let body = record("tls1");
    let reply = common::runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let request = format!(
            "POST /v1/metrics HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer s3cret\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        tls.read_to_string(&mut reply).await.unwrap_or_default();
        reply
    });
    assert!(reply.starts_with("HTTP/1.1 202"), "{reply}");
    // Plain HTTP to the TLS port gets no reply.
    let mut plain = connect(&gw.url);
    plain.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    assert!(!read_until_closed(&mut plain).contains("200"));
    assert_eq!(messages_in_topic(&stack, 2), 1);
}

/// Telegraf's documented output, with the `host` tag its agent adds and timestamps of now.
fn telegraf_body(now_ns: i64) -> String {
    let mut body = String::new();
    for plugin in ["cpu", "mem", "disk", "net", "system"] {
        let path = format!("{}/tests/fixtures/telegraf/{plugin}.lp", env!("CARGO_MANIFEST_DIR"));
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let (series, rest) = line.split_once(' ').unwrap();
            let series = if series.contains(",host=") { series.to_owned() } else { format!("{series},host=fx") };
            let (fields, _time) = rest.rsplit_once(' ').unwrap();
            body.push_str(&format!("{series} {fields} {now_ns}\n"));
        }
    }
    body
}

#[test]
fn telegraf_fixtures_land_with_every_series_distinct() {
    let stack = Stack::start("gateway_telegraf", 2);
    let gw = Gateway::start(&stack, &[]);
    let now_ns = (fleetflow::record::now_ms() - 5_000) * 1_000_000;
    let r = send(
        &format!("{}/api/v2/write?precision=ns", gw.url),
        gzip(telegraf_body(now_ns).as_bytes()),
        &[("content-encoding", "gzip"), ("authorization", "Token unused")],
    );
    // loaner + 5 cpu series; fx + fx|mem; 4 disks; eth0 + all (84 fields: 2 records); system.
    assert_eq!((r.status, r.body["accepted"].as_u64()), (202, Some(16)), "{}", r.body);

    let mut job = Job::start(&stack, "job", 1, 1, &["--exit-when-idle", "2s"]);
    job.wait_success(Duration::from_secs(120));
    assert_eq!(stack.db.scalar("SELECT count(*) FROM metrics"), 16);
    assert_eq!(stack.db.scalar("SELECT count(DISTINCT server_id) FROM metrics"), 16);
    for id in ["loaner|cpu,cpu=cpu0", "loaner|cpu,cpu=cpu1", "loaner|cpu,cpu=cpu3", "loaner|cpu,cpu=cpu-total"] {
        assert_eq!(
            stack.db.scalar(&format!("SELECT count(*) FROM metrics WHERE server_id = '{id}' AND extra ? 'usage_idle' AND extra ? 'time_idle'")),
            1,
            "{id}"
        );
    }
    assert_eq!(
        stack.db.scalar("SELECT count(*) FROM metrics WHERE server_id = 'loaner' AND cpu > 17.6 AND cpu < 17.7"),
        1
    );
    assert_eq!(stack.db.scalar("SELECT count(*) FROM metrics WHERE server_id = 'fx' AND ram > 15.9 AND ram < 16"), 1);
    assert_eq!(stack.db.scalar("SELECT count(*) FROM metrics WHERE server_id LIKE 'fx|disk,%'"), 4);
    assert_eq!(stack.db.scalar("SELECT count(*) FROM metrics WHERE server_id LIKE 'HOST|net,interface=all%'"), 2);
    assert_eq!(
        stack.db.scalar(
            "SELECT count(*) FROM metrics WHERE server_id = 'tyrion|system' AND extra ? 'uptime' AND extra ? 'load1'"
        ),
        1
    );
}
