//! A value worker 0 decides, given to every worker: a barrier for start-up decisions that
//! one worker must take for the whole job (which job holds the topic, where to start).

use std::time::Duration;

use timely::dataflow::operators::vec::{Broadcast, Input};
use timely::dataflow::operators::{Inspect, Probe};
use timely::worker::Worker;
use timely::ExchangeData;

/// Sends worker 0's `value` to every worker and waits until each has it. Every worker must
/// call it (the others with `None`); each returns worker 0's value.
///
/// ```
/// timely::execute(timely::Config::process(2), |worker| {
///     let mine = (worker.index() == 0).then_some(42u64);
///     let agreed = fleetflow_dataflows::from_first_worker::from_first_worker(worker, mine);
///     assert_eq!(agreed, Some(42));
/// })
/// .unwrap();
/// ```
pub fn from_first_worker<T: ExchangeData + Clone>(worker: &mut Worker, value: Option<T>) -> Option<T> {
    let received = std::rc::Rc::new(std::cell::RefCell::new(None));
    let seen = received.clone();
    let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
        let (input, stream) = scope.new_input::<T>();
        let (probe, _) = stream.broadcast().inspect(move |x| *seen.borrow_mut() = Some(x.clone())).probe();
        (input, probe)
    });
    if let Some(value) = value.filter(|_| worker.index() == 0) {
        input.send(value);
    }
    drop(input);
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(5)));
    }
    received.take()
}
