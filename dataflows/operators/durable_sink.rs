//! The durable sink: writes each closed epoch to TimescaleDB and holds the epoch's
//! capability until the write has committed.
//!
//! An epoch's records are split by key group between the worker's database connections
//! (`--sink-connections`), each with its own writer; the epoch is durable once every part is.
//! Holding the capability is what gives the frontier downstream of this operator its
//! meaning: when a probe there has passed epoch `t`, every worker's rows for `t` are in the
//! database. The writing itself happens on a tokio task (see `sink::writer`), so the worker
//! thread keeps reading Kafka while a COPY runs; the task wakes the operator through a
//! `SyncActivator` when an epoch is durable.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::Arc;

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use super::batch::cut_batches;
use crate::envelope::Envelope;
use crate::partitioning::{key_group_connection, key_group_owner};
use crate::sink::writer::{spawn_writer, EpochWrite, WriterSettings};
use crate::stats::Stats;

/// Routes envelopes to the worker owning their key group, writes them epoch by epoch, and
/// emits each epoch's number once it is durable.
pub trait WriteDurably<'scope> {
    fn write_durably(
        self,
        settings: WriterSettings,
        batch_size: usize,
        runtime: tokio::runtime::Handle,
        stats: Arc<Stats>,
    ) -> Stream<'scope, u64, Vec<u64>>;
}

impl<'scope> WriteDurably<'scope> for Stream<'scope, u64, Vec<Envelope>> {
    fn write_durably(
        self,
        settings: WriterSettings,
        batch_size: usize,
        runtime: tokio::runtime::Handle,
        stats: Arc<Stats>,
    ) -> Stream<'scope, u64, Vec<u64>> {
        let scope = self.scope();
        let workers = scope.peers();
        // Same function in every process: key group -> owning worker.
        let route = Exchange::new(move |e: &Envelope| key_group_owner(e.key_group, workers) as u64);

        self.unary_frontier(route, "DurableSink", move |initial, info| {
            drop(initial);
            let activator = scope.worker().sync_activator_for(info.address.to_vec());
            let (durable_tx, durable_rx) = mpsc::channel::<u64>();
            let connections = settings.connections;
            // One writer per database connection, each for its share of the key groups.
            let writers: Vec<_> = (0..connections)
                .map(|connection| {
                    let (durable_tx, activator) = (durable_tx.clone(), activator.clone());
                    let settings = WriterSettings { connection, ..settings.clone() };
                    spawn_writer(&runtime, settings, stats.clone(), move |epoch| {
                        // Both fail only when the dataflow is gone, and then nobody is waiting.
                        let _ = durable_tx.send(epoch);
                        let _ = activator.activate();
                    })
                })
                .collect();
            // Epochs still receiving records, and epochs handed to the writers (with how
            // many writers have yet to commit their part).
            let mut open: BTreeMap<u64, (Capability<u64>, Vec<Envelope>)> = BTreeMap::new();
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
                    let mut parts: Vec<Vec<Envelope>> = vec![Vec::new(); connections];
                    for record in records {
                        parts[key_group_connection(record.key_group, workers, connections)].push(record);
                    }
                    let mut pending = 0;
                    for (writer, mut part) in writers.iter().zip(parts) {
                        if part.is_empty() {
                            continue;
                        }
                        // timely may reorder the containers of one epoch; put each partition's
                        // records back in offset order (the watermarks rely on it).
                        part.sort_unstable_by_key(|e| (e.partition, e.offset));
                        let batches = cut_batches(part, batch_size);
                        // The writer task lives as long as this operator holds `writers`.
                        let _ = writer.send(EpochWrite { epoch, batches });
                        pending += 1;
                    }
                    if pending == 0 {
                        // Nothing to write (timely delivered only empty containers): durable.
                        output.session(&cap).give(epoch);
                    } else {
                        writing.insert(epoch, (cap, pending));
                    }
                }
                // Parts the writers committed: once all of an epoch's parts are, announce it
                // and release its capability.
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
