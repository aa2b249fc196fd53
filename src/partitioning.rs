//! Which key group a message belongs to: its serverId (from the key, else the body) hashed
//! into one of [`KEY_GROUPS`]. Which worker writes a key group is `fleetflow_dataflows::routing`.
//!
//! Every process must compute the same answers, so nothing here uses a randomly seeded hash.
//! Key groups are the unit of exactly-once bookkeeping (see `sink::watermarks` and
//! docs/architecture.md).

use std::hash::Hasher;

pub use fleetflow_dataflows::routing::KEY_GROUPS;

/// The key group of a serverId: FNV-1a (64 bit, fixed offset basis) modulo [`KEY_GROUPS`].
///
/// ```
/// use fleetflow::partitioning::key_group;
/// assert_eq!(key_group(b"s17"), key_group(b"s17"));
/// assert!(key_group(b"s17") < 256);
/// ```
pub fn key_group(server_id: &[u8]) -> u16 {
    let mut h = fnv::FnvHasher::default();
    h.write(server_id);
    (h.finish() % KEY_GROUPS as u64) as u16
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
    match key {
        Some(k) if !k.is_empty() => key_group(k),
        _ => match crate::record::body_server_id(value) {
            Some(server_id) => key_group(server_id.as_bytes()),
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
        // Pinned values (computed independently with a reference FNV-1a): if these change,
        // stored watermarks no longer match their rows.
        assert_eq!(key_group(b"s1"), 73);
        assert_eq!(key_group(b"s17"), 26);
        assert_eq!(key_group(b""), (0xcbf29ce484222325u64 % 256) as u16);
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
        }
    }
}
