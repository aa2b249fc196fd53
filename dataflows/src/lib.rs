//! # fleetflow's dataflow
//!
//! The heart of fleetflow: a [timely](https://docs.rs/timely) dataflow that carries records
//! from the partitions of a log (Kafka) into a store (TimescaleDB) exactly once, and commits
//! the log's offsets only behind the **durable frontier**. This crate knows no Kafka and no
//! PostgreSQL client: the job gives each worker a [`PartitionReader`], an [`EpochWriter`] per
//! database connection and an [`OffsetCommitter`] (in the `fleetflow` crate:
//! `kafka::source`, `sink::writer`, `sink::offsets`). The [`fakes`] implement them in memory,
//! which is how the promises below are tested without a broker or a database.
//!
//! ## The path of a record
//!
//! ```text
//!  Kafka partition p ──(worker p mod N reads it)──> source: decode, stamp with the open epoch
//!        │   epoch closes after --epoch-records / --epoch-bytes / --epoch-interval,
//!        │   remembering the next offset of each partition (source)
//!        ▼
//!  exchange by key group (serverId → one of 256 groups → worker g mod N)   (routing)
//!        ▼
//!  durable sink: a complete epoch, cut into batches of --batch-size        (durable_sink,
//!        │   → the worker's writers, one per database connection           batch)
//!        │   (COPY + rows' watermarks in one transaction, off the worker thread);
//!        │   the epoch's capability is held until every writer reported it
//!        ▼
//!  probe: the durable frontier = least epoch not yet durable on every worker
//!        ▼
//!  commit stage: offsets of epochs behind the frontier → the committer     (commit)
//!        (same database as the rows), then mirrored to the consumer group
//! ```
//!
//! The worker loop around the dataflow ([`ingest::Ingest::turn`]) reads, cuts epochs,
//! applies backpressure and runs the commit stage; [`ingest::run_worker`] runs it to the end.
//!
//! ## The promises, and the tests that hold them
//!
//! - **Offsets only behind the durable frontier.** An epoch's offsets are committed only once
//!   every worker's records of it and of all earlier epochs are durable: a writer that is
//!   slow, stuck, retrying, or that reports epochs out of order never lets an offset through
//!   early. After a crash the job resumes from the committed offsets, so nothing committed
//!   is lost; what was durable but not committed is read again and the writers' watermarks
//!   drop it. (The crate's `promises` tests, one per promise, with a property test over random
//!   schedules of reads, completions and crashes; `cargo test -p fleetflow-dataflows`.)
//! - **No worker waits on another's epoch count**: epochs are stamped with the wall clock,
//!   so every worker's epochs stand for the same moments, and a source with nothing to read
//!   (an idle partition, a worker without partitions) keeps its epoch up with the clock.
//! - **Bounded memory**: a source holds at most `max_epochs_in_flight` closed epochs and
//!   `max_bytes_in_flight` bytes not yet durable, then stops reading (and asks its reader to
//!   stop fetching).
//! - **One writer per key group**: every process computes the same [`routing`], so each
//!   (key group, partition) is written in offset order by exactly one writer, which is what
//!   its watermark relies on.
//!
//! ## Layout
//!
//! - [`source`]: the [`PartitionReader`] trait, the [`Record`] trait, epoch cutting.
//! - [`routing`]: partitions to source workers, key groups to sink workers and connections.
//! - [`durable_sink`]: the [`EpochWriter`] trait and the operator that holds capabilities
//!   until writes are durable ([`WriteDurably`]).
//! - [`batch`]: cutting an epoch into batches.
//! - [`commit`]: the [`OffsetCommitter`] trait and the commit stage.
//! - [`ingest`]: the dataflow and the worker loop.
//! - [`from_first_worker`]: one worker decides, every worker learns (start-up barriers).
//! - [`fakes`]: in-memory reader, writers and committer.
//!
//! The repository's `docs/architecture.md` tells the rest: the schema, fencing, the topic
//! watch, exit codes.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod alerts;
pub mod batch;
pub mod commit;
pub mod durable_sink;
pub mod fakes;
pub mod from_first_worker;
pub mod ingest;
pub mod routing;
pub mod source;

#[cfg(test)]
mod promises;

pub use commit::OffsetCommitter;
pub use durable_sink::{Durable, EpochWriter, SinkShape, WriteDurably};
pub use ingest::{Ingest, IngestSettings, Observer, Turn};
pub use source::{PartitionReader, Record, Stop};
