//! Which key group a message belongs to: its serverId (from the key, else the body) hashed
//! into one of [`KEY_GROUPS`]. Which worker writes a key group is `fleetflow_dataflows::routing`.
//!
//! Every process must compute the same answers, so nothing here uses a randomly seeded hash.
//! Key groups are the unit of exactly-once bookkeeping (see `sink::watermarks` and
//! docs/architecture.md).
//!
//! The hash is the one Kafka's default partitioner uses on a record's key (murmur2 with
//! Kafka's seed, made positive: librdkafka's `murmur2` partitioners and Java's default
//! partitioner agree on it). So when a topic is keyed by serverId (the gateway and the load
//! generator do that) and its partition count divides [`KEY_GROUPS`], a key group's records
//! all sit in one partition, `key group mod partitions`; and when the worker count also
//! divides the partition count, the worker that reads a partition is the one that writes its
//! key groups (both are "mod workers"), so no record crosses to another worker or process.
//! Other shapes stay correct; their records just cross.
//!
//! Schema versions before 7 hashed with FNV-1a; [`fnv_message_key_group`] still computes
//! those key groups for the watermarks written then (`sink::watermarks::FnvWatermarks`).

use std::hash::Hasher;

pub use fleetflow_dataflows::routing::KEY_GROUPS;

/// Kafka's partitioning hash of a key: murmur2 with Kafka's seed, sign bit cleared. The
/// default partitioner puts a keyed record in partition `kafka_key_hash(key) % partitions`.
pub fn kafka_key_hash(key: &[u8]) -> u32 {
    murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff
}

/// The key group of a serverId: [`kafka_key_hash`] modulo [`KEY_GROUPS`].
///
/// ```
/// use fleetflow::partitioning::{kafka_key_hash, key_group};
/// assert_eq!(key_group(b"s17"), key_group(b"s17"));
/// assert!(key_group(b"s17") < 256);
/// // In a topic of 4 partitions keyed by serverId, s17 is in partition key_group % 4.
/// assert_eq!(key_group(b"s17") % 4, (kafka_key_hash(b"s17") % 4) as u16);
/// ```
pub fn key_group(server_id: &[u8]) -> u16 {
    (kafka_key_hash(server_id) % KEY_GROUPS as u32) as u16
}

/// The key group of a message, valid or not: a pure function of its key, its value and its
/// partition, so a message keeps its key group in every run whatever the clock, the limits
/// (`--max-age`, `--max-message-bytes`, ...) or the code's verdict on it. That is what the
/// watermarks need: the offsets of one (key group, partition) are written in order by one
/// writer, and a replayed message is checked against the watermark of the key group it was
/// first written under.
///
/// - a non-empty Kafka key: the key group of the key;
/// - else, when the value is a JSON object with a string `serverId` (see
///   [`crate::record::body_server_id`]: at most [`crate::record::MAX_MESSAGE_BYTES`] bytes, no
///   limits, no clock): the key group of that serverId;
/// - else the partition (so keyless garbage spreads like the partitions do).
///
/// A valid record's key group is always the key group of its serverId (its key, when it has
/// one, equals its serverId; without a key, `body_server_id` finds the serverId decode kept),
/// so the job computes it from the decoded record and parses again only for dead letters.
///
/// ```
/// use fleetflow::partitioning::{key_group, message_key_group};
/// let body = br#"{"serverId":"s17","cpu":"high"}"#;
/// assert_eq!(message_key_group(None, body, 3), key_group(b"s17"));
/// assert_eq!(message_key_group(Some(b"s17"), b"garbage", 3), key_group(b"s17"));
/// assert_eq!(message_key_group(None, b"garbage", 3), 3);
/// ```
pub fn message_key_group(key: Option<&[u8]>, value: &[u8], partition: i32) -> u16 {
    message_key_group_by(key_group, key, value, partition)
}

/// The key group a message had under schema versions before 7 (FNV-1a, 64 bit, fixed offset
/// basis, modulo [`KEY_GROUPS`]), by the same rules as [`message_key_group`].
pub fn fnv_message_key_group(key: Option<&[u8]>, value: &[u8], partition: i32) -> u16 {
    message_key_group_by(fnv_key_group, key, value, partition)
}

fn fnv_key_group(server_id: &[u8]) -> u16 {
    let mut h = fnv::FnvHasher::default();
    h.write(server_id);
    (h.finish() % KEY_GROUPS as u64) as u16
}

fn message_key_group_by(hash: fn(&[u8]) -> u16, key: Option<&[u8]>, value: &[u8], partition: i32) -> u16 {
    match key {
        Some(k) if !k.is_empty() => hash(k),
        _ => match crate::record::body_server_id(value) {
            Some(server_id) => hash(server_id.as_bytes()),
            None => partition_key_group(partition),
        },
    }
}

/// The key group of a message that names no server at all: its partition's.
fn partition_key_group(partition: i32) -> u16 {
    partition.rem_euclid(KEY_GROUPS as i32) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_groups_are_stable_across_builds() {
        // Pinned values (librdkafka's partitioner over 256 partitions agrees, below): if these
        // change, stored watermarks no longer match their rows.
        assert_eq!(key_group(b"s1"), 253);
        assert_eq!(key_group(b"s17"), 240);
        assert_eq!(fnv_key_group(b"s1"), 73, "FNV-1a, computed with a reference implementation");
        assert_eq!(fnv_key_group(b"s17"), 26);
        assert_eq!(fnv_key_group(b""), (0xcbf29ce484222325u64 % 256) as u16);
    }

    /// librdkafka's own murmur2 partitioner (what the gateway's and the load generator's
    /// producers use), called through its C API.
    #[allow(unsafe_code)] // a test's only way to reach librdkafka's partitioner
    fn librdkafka_partition(key: &[u8], partitions: i32) -> i32 {
        // SAFETY: the murmur2 partitioner only hashes the key; it reads neither the topic
        // handle nor the opaques, which may therefore be null.
        unsafe {
            rdkafka::bindings::rd_kafka_msg_partitioner_murmur2(
                std::ptr::null(),
                key.as_ptr().cast(),
                key.len(),
                partitions,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
    }

    #[test]
    fn a_key_group_lies_in_the_partition_kafkas_default_partitioner_picks() {
        let keys: Vec<Vec<u8>> = (0..5_000)
            .map(|i| format!("s{i}").into_bytes())
            .chain([b"".to_vec(), b"a".to_vec(), b"ab".to_vec(), b"abc".to_vec(), "s\u{e9}rver-\u{1f600}".into()])
            .collect();
        for key in &keys {
            for partitions in 1..=40 {
                let expected = librdkafka_partition(key, partitions);
                assert_eq!((kafka_key_hash(key) % partitions as u32) as i32, expected, "{key:?} of {partitions}");
                if KEY_GROUPS as i32 % partitions == 0 {
                    assert_eq!((key_group(key) as i32) % partitions, expected, "{key:?} of {partitions}");
                }
            }
        }
    }

    #[test]
    fn messages_route_by_key_then_body_server_id_then_partition() {
        assert_eq!(message_key_group(None, b"not json", 3), 3);
        assert_eq!(message_key_group(Some(b""), b"[1]", 300), 44);
        assert_eq!(message_key_group(Some(b"s17"), b"not json", 3), key_group(b"s17"));
        // The key wins over the body (a valid record has both equal anyway).
        assert_eq!(message_key_group(Some(b"s17"), br#"{"serverId":"s1"}"#, 3), key_group(b"s17"));
        // Keyless (or empty key): the body's serverId, whatever else the body gets wrong.
        for body in
            [&br#"{"serverId":"s1","cpu":1}"#[..], br#"{"serverId":"s1","ts":1}"#, br#"{"cpu":"x","serverId":"s1"}"#]
        {
            assert_eq!(message_key_group(None, body, 3), key_group(b"s1"));
            assert_eq!(message_key_group(Some(b""), body, 3), key_group(b"s1"));
        }
        // No string serverId: the partition.
        assert_eq!(message_key_group(None, br#"{"serverId":17,"cpu":1}"#, 5), 5);
        assert_eq!(message_key_group(None, br#"{"cpu":1}"#, 5), 5);
        assert_eq!(message_key_group(None, br#"{"serverId":"s1""#, 5), 5);
    }

    proptest! {
        #[test]
        fn every_server_id_has_a_key_group(id in ".{0,40}") {
            let g = key_group(id.as_bytes());
            prop_assert!(g < KEY_GROUPS);
            prop_assert!(fnv_key_group(id.as_bytes()) < KEY_GROUPS);
        }
    }
}
