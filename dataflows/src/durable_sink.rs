//! The durable sink: routes records to the worker that owns their key group, hands each
//! complete epoch to that worker's [`EpochWriter`]s, and holds the epoch's capability until
//! every writer reported it durable.
//!
//! Holding the capability is what gives the frontier downstream of this operator its
//! meaning: when a probe there has passed epoch `t`, every worker's records of `t` are
//! durable. Writers work off the worker thread (the job's write on a tokio task), so the
//! worker keeps reading while a write runs; a writer reports an epoch through its
//! [`Durable`] handle, which wakes the operator.

use std::collections::BTreeMap;
use std::sync::mpsc;

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::scheduling::SyncActivator;

use crate::batch::cut_batches;
use crate::routing::{key_group_connection, key_group_owner};
use crate::source::Record;

/// Writes one worker's share of an epoch (one database connection's key groups) durably.
///
/// `write` must not block: it hands the work over (to a task, a thread) and the writer
/// reports the epoch with [`Durable::epoch`] once its records are durable, in any order and
/// from any thread. A writer that cannot write keeps retrying (or stops the process): until
/// it reports, the epoch and every later one stay behind the durable frontier, so their
/// offsets are not committed. The job implements it with tokio-postgres
/// (`fleetflow::sink::writer`); [`crate::fakes::FakeDatabase`] is an in-memory one.
pub trait EpochWriter<R>: 'static {
    /// Hands over epoch `epoch`'s records for this writer, cut into batches of at most the
    /// batch size, each partition's records in offset order.
    fn write(&mut self, epoch: u64, batches: Vec<Vec<R>>);
}

/// How a writer reports an epoch durable. Cheap to clone; `Send`.
#[derive(Clone)]
pub struct Durable {
    tx: mpsc::Sender<u64>,
    activator: SyncActivator,
}

impl Durable {
    /// Reports that this writer's part of `epoch` is durable.
    pub fn epoch(&self, epoch: u64) {
        // Both fail only once the dataflow is gone, and then nobody is waiting.
        let _ = self.tx.send(epoch);
        let _ = self.activator.activate();
    }
}

/// The shape of a worker's sink.
#[derive(Clone, Copy, Debug)]
pub struct SinkShape {
    /// Records per batch handed to a writer.
    pub batch_size: usize,
    /// Writers (database connections) per worker; each gets a fixed share of the worker's
    /// key groups ([`crate::routing::key_group_connection`]).
    pub connections: usize,
}

/// Writes a stream of records durably, epoch by epoch.
pub trait WriteDurably<'scope, R: Record> {
    /// Routes each record to the worker owning its key group, gives each complete epoch to
    /// the writers `make_writer(connection, durable)` creates (one per connection), and
    /// emits each epoch's number once all of its writers reported it durable.
    ///
    /// ```
    /// use fleetflow_dataflows::durable_sink::{SinkShape, WriteDurably};
    /// use fleetflow_dataflows::fakes::{FakeDatabase, FakeRecord};
    /// use timely::dataflow::operators::{Input, Inspect, Probe};
    ///
    /// let database = FakeDatabase::completing();
    /// let db = database.clone();
    /// timely::execute_directly(move |worker| {
    ///     let mut input = timely::dataflow::InputHandle::new();
    ///     let shape = SinkShape { batch_size: 2, connections: 1 };
    ///     let probe = worker.dataflow::<u64, _, _>(|scope| {
    ///         scope.input_from(&mut input).container::<Vec<FakeRecord>>()
    ///             .write_durably(shape, |connection, durable| db.writer(connection, durable))
    ///             .probe()
    ///             .0
    ///     });
    ///     for offset in 0..5 {
    ///         input.send(FakeRecord::new(0, offset));
    ///     }
    ///     input.advance_to(1);
    ///     while probe.less_than(&1) {
    ///         worker.step();
    ///     }
    /// });
    /// assert_eq!(database.durable_offsets(0), vec![0, 1, 2, 3, 4]);
    /// ```
    fn write_durably<W, F>(self, shape: SinkShape, make_writer: F) -> Stream<'scope, u64, Vec<u64>>
    where
        W: EpochWriter<R>,
        F: FnMut(usize, Durable) -> W;
}

impl<'scope, R: Record> WriteDurably<'scope, R> for Stream<'scope, u64, Vec<R>> {
    fn write_durably<W, F>(self, shape: SinkShape, mut make_writer: F) -> Stream<'scope, u64, Vec<u64>>
    where
        W: EpochWriter<R>,
        F: FnMut(usize, Durable) -> W,
    {
        let scope = self.scope();
        let workers = scope.peers();
        let SinkShape { batch_size, connections } = shape;
        let connections = connections.max(1);
        // Same function in every process: key group -> owning worker.
        let route = Exchange::new(move |r: &R| key_group_owner(r.key_group(), workers) as u64);

        self.unary_frontier(route, "DurableSink", move |initial, info| {
            drop(initial);
            let activator = scope.worker().sync_activator_for(info.address.to_vec());
            let (tx, durable_rx) = mpsc::channel::<u64>();
            let mut writers: Vec<W> = (0..connections)
                .map(|connection| make_writer(connection, Durable { tx: tx.clone(), activator: activator.clone() }))
                .collect();
            // Epochs still receiving records, and epochs handed to the writers (with how
            // many writers have yet to report their part).
            let mut open: BTreeMap<u64, (Capability<u64>, Vec<R>)> = BTreeMap::new();
            let mut writing: BTreeMap<u64, (Capability<u64>, usize)> = BTreeMap::new();

            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    let Some(held) = cap.retain_least(0) else {
                        return;
                    };
                    let entry = open.entry(*held.time()).or_insert_with(|| (held, Vec::new()));
                    for container in data {
                        entry.1.append(container);
                    }
                });
                // Epochs the input frontier has passed are complete: hand them over in order.
                while let Some(entry) = open.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (epoch, (cap, records)) = entry.remove_entry();
                    let parts: Vec<Vec<R>> = if connections == 1 {
                        vec![records]
                    } else {
                        // Sized for an even split, so the parts rarely grow (records are large).
                        let share = records.len() / connections + 1;
                        let mut parts: Vec<Vec<R>> = (0..connections).map(|_| Vec::with_capacity(share)).collect();
                        for record in records {
                            parts[key_group_connection(record.key_group(), workers, connections)].push(record);
                        }
                        parts
                    };
                    let mut pending = 0;
                    for (writer, mut part) in writers.iter_mut().zip(parts) {
                        if part.is_empty() {
                            continue;
                        }
                        // timely may reorder the containers of one epoch; put each partition's
                        // records back in offset order (the writers' watermarks rely on it).
                        part.sort_unstable_by_key(|r| (r.partition(), r.offset()));
                        writer.write(epoch, cut_batches(part, batch_size));
                        pending += 1;
                    }
                    if pending == 0 {
                        // Nothing to write (only empty containers arrived): durable already.
                        output.session(&cap).give(epoch);
                    } else {
                        writing.insert(epoch, (cap, pending));
                    }
                }
                // Parts the writers reported: once all of an epoch's parts are durable,
                // announce it and release its capability.
                while let Ok(epoch) = durable_rx.try_recv() {
                    if let Some((_, pending)) = writing.get_mut(&epoch) {
                        *pending -= 1;
                        if *pending == 0 {
                            let (cap, _) = writing.remove(&epoch).expect("present above");
                            output.session(&cap).give(epoch);
                        }
                    }
                }
            }
        })
    }
}
