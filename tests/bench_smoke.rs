//! A small run of `fleetflow bench`: it must run end to end and report sane, non-zero
//! figures. It never checks a speed: CI machines are shared and noisy.

mod common;

use std::process::Command;

use common::{test_dir, Broker, Database};

#[test]
fn bench_runs_and_reports_non_zero_figures() {
    let dir = test_dir("bench_smoke");
    let broker = Broker::start(&dir);
    let db = Database::create("bench_smoke");
    let output = dir.join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetflow"))
        .args(["bench", "--brokers", &broker.addr, "--database-url", &db.url, "--records", "20000"])
        .args(["--shapes", "1x1,2x1", "--latency-seconds", "3", "--output", output.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Kafka ceiling") && stdout.contains("2x2    --dedup natural-key"), "{stdout}");
    assert!(stdout.contains("db/COPY") && stdout.contains("kafka s/M"), "{stdout}");
    println!("{stdout}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    for key in [
        "kafka_ceiling_records_per_second",
        "database_ceiling_rows_per_second",
        "database_ceiling_cpu_seconds_per_million",
        "produce_records_per_second",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}: {report}");
    }
    let jobs = report["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4, "1x1, 2x1, the dedup run and the run without rollups");
    for job in jobs {
        assert_eq!(job["rows"], 20_000, "{job}");
        assert!(job["rows_per_second"].as_f64().unwrap() > 0.0, "{job}");
        assert!(job["ratio_to_ceiling"].as_f64().unwrap() > 0.0, "{job}");
        assert!(job["cpu_seconds_per_million"].as_f64().unwrap() > 0.0, "{job}");
        // The split of the work: the database and the broker did some, the cores were busy.
        assert!(job["database_cpu_seconds_per_million"].as_f64().unwrap() > 0.0, "{job}");
        assert!(job["broker_cpu_seconds_per_million"].as_f64().unwrap() > 0.0, "{job}");
        let busy = job["machine_utilisation"].as_f64().unwrap();
        assert!(busy > 0.0 && busy <= 1.0, "{job}");
        assert!(job["peak_rss_mib_per_process"].as_array().unwrap().iter().all(|m| m.as_f64().unwrap() > 1.0), "{job}");
    }
    // A stream of only malformed records (half the count), and a flood of large messages.
    assert_eq!(report["bad_only"]["records"], 10_000, "{report}");
    assert!(report["bad_only"]["dead_letters_per_second"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["big"]["messages"], 200, "{report}");
    let big = &report["big"];
    assert!(big["peak_rss_mib"].as_f64().unwrap() > 1.0 && big["bound_mib"].as_f64().unwrap() > 64.0, "{report}");
    // The same recent records without and with ten alert rules.
    let alerts = &report["alerts"];
    assert_eq!((alerts["records"].as_u64(), alerts["rules"].as_u64()), (Some(10_000), Some(10)), "{report}");
    for key in ["without_rows_per_second", "with_rows_per_second", "without_peak_rss_mib", "with_peak_rss_mib"] {
        assert!(alerts[key].as_f64().unwrap() > 0.0, "{key}: {report}");
    }
    assert!(stdout.contains("10 rules"), "{stdout}");
    assert!(report["latency_p99_ms"].as_u64().unwrap() >= report["latency_p50_ms"].as_u64().unwrap());
    assert!(report["latency_p50_ms"].as_u64().unwrap() > 0, "{report}");
}
