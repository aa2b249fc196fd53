//! The dataflow's partition reader, made of Kafka: the worker's consumer, the offset and
//! topic watches, and decoding. Each message becomes an [`Envelope`]: a valid record, or a
//! dead letter with its reason (a bad message never stops the job).

use std::sync::Arc;
use std::time::Instant;

use rdkafka::Message;

use super::consumer::{PartitionReader as Consumer, Polled, StartOffset};
use super::landmarks::message_hash;
use super::topic_watch::{PartitionWatch, TopicCheck};
use super::watch::OffsetWatch;
use crate::context::IngestContext;
use crate::envelope::Envelope;
use crate::record::{decode, now_ms};
use crate::sink::offsets::{Landmark, Landmarks};
use crate::sink::watermarks::FnvWatermarks;
use crate::stats::{KindLabels, Stats};
use fleetflow_dataflows::Stop;

/// Reads one worker's partitions for the dataflow (`fleetflow_dataflows::PartitionReader`).
pub struct KafkaSource<'a> {
    ctx: &'a IngestContext,
    consumer: Consumer,
    /// Next offset to read per owned partition (known once a message was read or the start
    /// was an explicit offset), checked against every message.
    offsets: OffsetWatch,
    watch: PartitionWatch,
    landmarks: Arc<Landmarks>,
    /// Partitions whose landmark the current read call has noted.
    noted: Vec<i32>,
    /// What a job of a version before schema 7 wrote: not handed over again.
    fnv: FnvWatermarks,
}

impl<'a> KafkaSource<'a> {
    /// Opens the consumer of `partitions` (this worker's, out of `workers`) at `starts`.
    pub fn open(
        ctx: &'a IngestContext,
        (worker, workers): (usize, usize),
        starts: &[(i32, StartOffset)],
        checked: &TopicCheck,
        landmarks: Arc<Landmarks>,
        fnv: FnvWatermarks,
    ) -> anyhow::Result<Self> {
        let consumer = Consumer::open(&ctx.config.kafka, &ctx.config.group, ctx.config.cluster.workers, starts)?;
        let mut offsets = OffsetWatch::default();
        for (p, s) in starts {
            offsets.add(*p, if let StartOffset::At(o) = s { Some(*o) } else { None });
        }
        let partitions: Vec<i32> = starts.iter().map(|(p, _)| *p).collect();
        let watch = PartitionWatch::new(ctx, worker, workers, &partitions, checked);
        Ok(KafkaSource { ctx, consumer, offsets, watch, landmarks, noted: Vec::new(), fnv })
    }
}

impl fleetflow_dataflows::PartitionReader for KafkaSource<'_> {
    type Record = Envelope;

    /// A message below its partition's expected offset is not handed over: the topic went
    /// back under the job, which stops.
    fn read(&mut self, mut emit: impl FnMut(Envelope, Option<i64>) -> bool) -> Result<usize, Stop> {
        let ctx = self.ctx;
        let now = now_ms();
        let arrived = Instant::now();
        let (mut read, mut dead, mut replayed) = (0, 0, 0);
        let mut error = None;
        self.noted.clear();
        loop {
            let message = match self.consumer.poll() {
                Polled::Message(m) => m,
                Polled::Nothing => break,
                Polled::Error(e) => {
                    error = Some(e);
                    break;
                }
            };
            if let Err(reset) = self.offsets.message(message.partition(), message.offset()) {
                return Err(Stop(self.watch.reset(&reset, ctx)));
            }
            self.watch.message(message.partition(), arrived);
            let raw = message.payload().unwrap_or_default();
            let time_ms = message.timestamp().to_millis();
            // Any message read below a committed offset can be its landmark: the first of each
            // partition in a read call will do, so only that one is hashed (epochs close
            // between read calls, so every commit has one below it).
            if let (Some(time_ms), false) = (time_ms, self.noted.contains(&message.partition())) {
                let hash = message_hash(message.key(), message.payload());
                self.landmarks.note(message.partition(), Landmark { offset: message.offset(), time_ms, hash });
                self.noted.push(message.partition());
            }
            if self.fnv.written(message.partition(), message.offset(), message.key(), raw) {
                // Its offset still moves on with the others, so it is committed like them.
                replayed += 1;
                continue;
            }
            let decoded = decode(raw, message.key(), time_ms, now, &ctx.config.limits);
            if let Err(e) = &decoded {
                dead += 1;
                ctx.stats.dead_letters_by_reason.get_or_create(&KindLabels { reason: e.kind().to_owned() }).inc();
            }
            let envelope = Envelope::new(message.partition(), message.offset(), message.key(), raw, time_ms, decoded);
            read += 1;
            if !emit(envelope, time_ms) {
                break;
            }
        }
        Stats::add(&ctx.stats.dead_letters, dead);
        Stats::add(&ctx.stats.replayed_skipped, replayed);
        if let Some(e) = error {
            self.consumer.note_error(&e);
        }
        Ok(read)
    }

    fn next_offsets(&self) -> Vec<(i32, i64)> {
        self.offsets.next_offsets()
    }

    fn at_end(&self) -> bool {
        self.consumer.all_at_end()
    }

    fn set_paused(&mut self, paused: bool) {
        self.consumer.set_paused(paused);
    }

    fn held_back(&mut self) {
        self.watch.held_back(Instant::now());
    }

    /// Lag, stalls, retention gaps, resets, added partitions (`topic_watch`).
    fn tick(&mut self) -> Result<(), Stop> {
        self.watch.tick(&mut self.consumer, &mut self.offsets, self.ctx).map_err(Stop)
    }

    /// Mirrors committed offsets to the consumer group, for tools that watch it.
    fn committed(&mut self, offsets: &[(i32, i64)]) {
        self.consumer.commit_to_group(offsets);
    }

    fn finish(&mut self) {
        self.watch.finish(self.ctx);
    }
}

impl fleetflow_dataflows::Record for Envelope {
    fn key_group(&self) -> u16 {
        self.key_group
    }
    fn partition(&self) -> i32 {
        self.partition
    }
    fn offset(&self) -> i64 {
        self.offset
    }
    fn approx_bytes(&self) -> usize {
        Envelope::approx_bytes(self)
    }
}
