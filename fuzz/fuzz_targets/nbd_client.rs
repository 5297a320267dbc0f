//! Fuzz target: arbitrary server bytes, in arbitrary pieces, into the agent's NBD client
//! handshake (what a node reads from a boot server before handing the socket to its kernel).
//!
//! Input layout: the first byte seeds how the rest is cut into `handle_input` calls.
//! Checked: nothing panics; output stays bounded (one option); once the handshake has ended,
//! input is refused; an outcome appears only when no more input is wanted.
#![no_main]

use boot_services::nbd::client::NbdClientHandshake;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let Ok(mut handshake) = NbdClientHandshake::new("af1349b9f5f9a1a6a0404dea36dcc949") else {
        return;
    };
    let mut state = u32::from(seed) | 1;
    let mut rest = stream;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let piece = (state as usize % 64 + 1).min(rest.len());
        let (now, later) = rest.split_at(piece);
        rest = later;
        let wanted = handshake.wants_input();
        let result = handshake.handle_input(now);
        if !wanted {
            assert!(result.is_err(), "input accepted after the handshake ended");
        }
        if let Some(output) = handshake.poll_output() {
            assert!(output.len() <= 4 + 16 + 4 + 64 + 4, "one GO option at most");
        }
        if handshake.outcome().is_some() {
            assert!(!handshake.wants_input());
        }
        if result.is_err() {
            break;
        }
    }
});
