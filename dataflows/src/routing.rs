//! Who handles what: Kafka partitions to source workers, key groups to sink workers and to
//! their database connections.
//!
//! Every process of a job must compute the same answers, so these are plain arithmetic.
//! Key groups are the unit of exactly-once bookkeeping (a writer keeps one watermark per key
//! group and partition): their number is fixed forever, so a job restarted with another
//! worker count still finds, for each key group, how far the previous run wrote.

/// Number of key groups. Fixed: changing it would orphan the stored watermarks.
pub const KEY_GROUPS: u16 = 256;

/// The worker (global index among `workers`) that writes a key group.
///
/// ```
/// assert_eq!(fleetflow_dataflows::routing::key_group_owner(7, 4), 3);
/// ```
pub fn key_group_owner(key_group: u16, workers: usize) -> usize {
    key_group as usize % workers
}

/// The worker that reads a Kafka partition: partition p goes to worker p mod N.
pub fn partition_owner(partition: i32, workers: usize) -> usize {
    partition as usize % workers
}

/// The partitions of a `partitions`-partition topic that `worker` reads.
///
/// ```
/// assert_eq!(fleetflow_dataflows::routing::owned_partitions(1, 2, 5), vec![1, 3]);
/// ```
pub fn owned_partitions(worker: usize, workers: usize, partitions: i32) -> Vec<i32> {
    (0..partitions).filter(|p| partition_owner(*p, workers) == worker).collect()
}

/// The key groups `worker` writes.
pub fn owned_key_groups(worker: usize, workers: usize) -> Vec<u16> {
    (0..KEY_GROUPS).filter(|g| key_group_owner(*g, workers) == worker).collect()
}

/// Which of a sink worker's `connections` database connections writes a key group. The
/// worker's own key groups (g, g + N, g + 2N, ...) are dealt out in turn.
pub fn key_group_connection(key_group: u16, workers: usize, connections: usize) -> usize {
    key_group as usize / workers % connections
}

/// The key groups that connection `connection` of sink worker `worker` writes.
pub fn connection_key_groups(worker: usize, workers: usize, connection: usize, connections: usize) -> Vec<u16> {
    owned_key_groups(worker, workers)
        .into_iter()
        .filter(|g| key_group_connection(*g, workers, connections) == connection)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_partition_has_exactly_one_owner() {
        for workers in 1..=7 {
            let mut seen = vec![0; 12];
            for w in 0..workers {
                for p in owned_partitions(w, workers, 12) {
                    seen[p as usize] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "workers={workers}: {seen:?}");
        }
    }

    #[test]
    fn a_workers_connections_split_its_key_groups_between_them() {
        for (workers, connections) in [(1, 1), (1, 2), (3, 2), (4, 3), (7, 5)] {
            for w in 0..workers {
                let mut split: Vec<u16> =
                    (0..connections).flat_map(|c| connection_key_groups(w, workers, c, connections)).collect();
                split.sort_unstable();
                assert_eq!(split, owned_key_groups(w, workers), "workers={workers} connections={connections}");
                let sizes: Vec<usize> =
                    (0..connections).map(|c| connection_key_groups(w, workers, c, connections).len()).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "uneven split {sizes:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn each_key_group_has_exactly_one_owner(g in 0..KEY_GROUPS, workers in 1usize..16) {
            let owner = key_group_owner(g, workers);
            prop_assert!(owner < workers);
            prop_assert!(owned_key_groups(owner, workers).contains(&g));
            for other in (0..workers).filter(|w| *w != owner) {
                prop_assert!(!owned_key_groups(other, workers).contains(&g));
            }
        }
    }
}
