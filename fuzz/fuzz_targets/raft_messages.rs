//! Fuzz target: what a peer server sends over the cluster channel: Raft request and reply
//! frame bodies, and snapshots (decoded before a follower replaces its state with them).
//!
//! Input layout: the first byte picks the decoder, the rest is the body.
//! Checked: nothing panics; whatever decodes re-encodes and decodes to the same message.
#![no_main]

use consensus::rpc::{RaftReply, RaftRequest, decode_body};
use consensus::store::decode_snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            if let Ok(request) = decode_body::<RaftRequest>(body) {
                let encoded = serde_json::to_vec(&request).expect("a decoded request encodes");
                let again: RaftRequest = decode_body(&encoded).expect("and decodes again");
                assert_eq!(format!("{request:?}"), format!("{again:?}"));
            }
        }
        1 => {
            if let Ok(reply) = decode_body::<RaftReply>(body) {
                let encoded = serde_json::to_vec(&reply).expect("a decoded reply encodes");
                let again: RaftReply = decode_body(&encoded).expect("and decodes again");
                assert_eq!(format!("{reply:?}"), format!("{again:?}"));
            }
        }
        _ => {
            if let Ok(state) = decode_snapshot(body) {
                for (address, lease) in &state.leases {
                    assert_eq!(state.lease_of(&lease.client).is_some(), true, "{address}");
                }
            }
        }
    }
});
