//! Cutting an epoch's records into COPY batches.

/// Splits `records` into batches of at most `max` records, keeping their order (records of
/// one key group and partition must reach the database in offset order).
///
/// ```
/// use fleetflow_dataflows::batch::cut_batches;
/// let batches = cut_batches((0..2500).collect::<Vec<u32>>(), 1000);
/// assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), vec![1000, 1000, 500]);
/// ```
pub fn cut_batches<T>(mut records: Vec<T>, max: usize) -> Vec<Vec<T>> {
    let max = max.max(1);
    if records.len() <= max {
        return if records.is_empty() { Vec::new() } else { vec![records] };
    }
    let mut batches = Vec::with_capacity(records.len().div_ceil(max));
    while records.len() > max {
        let rest = records.split_off(max);
        batches.push(std::mem::replace(&mut records, rest));
    }
    batches.push(records);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_input_gives_no_batches() {
        assert!(cut_batches(Vec::<u8>::new(), 1000).is_empty());
    }

    proptest! {
        #[test]
        fn batches_are_bounded_and_keep_order(n in 0usize..5000, max in 1usize..1500) {
            let batches = cut_batches((0..n).collect::<Vec<_>>(), max);
            prop_assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= max));
            let flat: Vec<usize> = batches.into_iter().flatten().collect();
            prop_assert_eq!(flat, (0..n).collect::<Vec<_>>());
        }
    }
}
