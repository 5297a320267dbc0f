//! Swarm frames from a peer: any byte stream is split into frames, each decoded or refused,
//! and every decoded message encodes back to the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transfer::swarm::wire::decode_frame;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((message, used))) = decode_frame(rest) {
        let mut again = Vec::new();
        message.encode(&mut again);
        assert_eq!(again.as_slice(), &rest[..used], "{message:?}");
        rest = &rest[used..];
    }
});
