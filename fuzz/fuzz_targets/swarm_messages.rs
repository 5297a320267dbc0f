//! Swarm frames from a peer: any byte stream is split into frames, each decoded or refused,
//! and every decoded message encodes back to the bytes it came from. The in-place reading of
//! a `Data` frame that fetchers use agrees with the decoder on every input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transfer::swarm::wire::{Message, data_frame_payload, decode_frame};

fuzz_target!(|data: &[u8]| {
    match (data_frame_payload(data), decode_frame(data)) {
        (Ok(Some((index, range))), Ok(Some((message, used)))) => {
            assert_eq!(used, data.len());
            assert_eq!(
                message,
                Message::Data {
                    index,
                    bytes: data[range].to_vec()
                }
            );
        }
        (Ok(Some(_)), other) => panic!("in place found data, the decoder {other:?}"),
        (Err(in_place), decoded) => assert_eq!(Err(in_place), decoded.map(|_| ())),
        (Ok(None), _) => {}
    }
    let mut rest = data;
    while let Ok(Some((message, used))) = decode_frame(rest) {
        let mut again = Vec::new();
        message.encode(&mut again);
        assert_eq!(again.as_slice(), &rest[..used], "{message:?}");
        rest = &rest[used..];
    }
});
