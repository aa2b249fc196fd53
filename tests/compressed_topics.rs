//! Every Kafka topic a user may have is read: producers compressing with gzip, snappy, lz4
//! and zstd write into one topic, and the job writes exactly all of their records (a codec
//! librdkafka was built without would stop the partitions holding such batches for good).

mod common;

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::{assert_exactly_once, Job, Stack};
use fleetflow::cli::LoadgenArgs;

const PER_CODEC: u64 = 5_000;
const CODECS: [&str; 4] = ["gzip", "snappy", "lz4", "zstd"];

#[test]
fn records_of_every_compression_codec_land_exactly_once() {
    let stack = Stack::start("compressed_topics", 4);
    // Whole seconds: the records' times are milliseconds from this start.
    let hours_ago = chrono::Utc::now().timestamp() - 3600 * (CODECS.len() as i64 + 1);
    let hour_ago = chrono::DateTime::from_timestamp(hours_ago, 0).unwrap();
    for (i, codec) in CODECS.iter().enumerate() {
        let mut kafka = stack.broker.kafka(&stack.topic);
        kafka.kafka_options = vec![("compression.type".into(), (*codec).into())];
        // Each producer its own hour, so no two records share (serverId, time).
        let start = hour_ago + chrono::Duration::hours(i as i64);
        let args = LoadgenArgs {
            kafka,
            start_time: Some(start.to_rfc3339()),
            ..stack.loadgen_args(PER_CODEC, 100, i as u64 + 1)
        };
        let report = fleetflow::loadgen::produce(&args, &AtomicBool::new(false)).unwrap();
        assert_eq!((report.delivered, report.failed), (PER_CODEC, 0), "{codec}: not every record was acknowledged");
    }

    // The broker kept each producer's batches as they were compressed (it does not recompress).
    assert_eq!(
        codecs_in_topic(&stack, PER_CODEC * CODECS.len() as u64),
        CODECS.iter().map(|c| c.to_string()).collect()
    );

    // A partition that cannot be read stops the job within the stall timeout, with its reason.
    let mut job = Job::start(&stack, "run", 1, 2, &["--exit-when-idle", "2s", "--stall-timeout", "20s"]);
    job.wait_success(Duration::from_secs(180));

    let total = PER_CODEC as i64 * CODECS.len() as i64;
    assert_exactly_once(&stack, total, 4);
    assert_eq!(stack.db.scalar("SELECT count(*) FROM fleetflow_dead_letters"), 0, "{}", job.log_tail());
    for (i, codec) in CODECS.iter().enumerate() {
        let start = hour_ago + chrono::Duration::hours(i as i64);
        let rows = stack.db.scalar(&format!(
            "SELECT count(*) FROM metrics WHERE time >= '{}' AND time < '{}'",
            start.to_rfc3339(),
            (start + chrono::Duration::hours(1)).to_rfc3339()
        ));
        assert_eq!(rows, PER_CODEC as i64, "rows of the {codec} producer");
    }
}

/// The codecs of the batches a consumer fetches while reading `count` messages, one batch
/// per fetch, from librdkafka's fetch debug log.
fn codecs_in_topic(stack: &Stack, count: u64) -> std::collections::BTreeSet<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::sync::{Arc, Mutex};

    struct Codecs(Arc<Mutex<std::collections::BTreeSet<String>>>);
    impl rdkafka::ClientContext for Codecs {
        fn log(&self, _: rdkafka::config::RDKafkaLogLevel, _: &str, message: &str) {
            // "[thrd:...]: broker: Enqueue 480 message(s) (... aborted msgsets, zstd)"
            if message.contains(": Enqueue ") {
                if let Some(codec) = message.trim_end_matches(')').rsplit(", ").next() {
                    if codec != "uncompressed" {
                        self.0.lock().unwrap().insert(codec.to_owned());
                    }
                }
            }
        }
    }
    impl rdkafka::consumer::ConsumerContext for Codecs {}

    let seen = Arc::new(Mutex::new(Default::default()));
    let consumer: BaseConsumer<Codecs> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.broker.addr)
        .set("group.id", "codec-check")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("debug", "fetch")
        // One batch per fetch: the log line names the codec of the fetch's last batch.
        .set("fetch.max.bytes", "1024")
        .set("max.partition.fetch.bytes", "1024")
        .set("message.max.bytes", "1000")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Debug)
        .create_with_context(Codecs(seen.clone()))
        .unwrap();
    consumer.subscribe(&[&stack.topic]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut read = 0;
    while read < count && std::time::Instant::now() < deadline {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            read += 1;
        }
    }
    assert_eq!(read, count, "the check consumer read every message");
    let codecs = seen.lock().unwrap().clone();
    codecs
}
