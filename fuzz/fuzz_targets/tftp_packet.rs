//! Round-trip fuzzing of the TFTP packet codec: decoding arbitrary bytes must never panic, and
//! every packet that decodes must encode to bytes that decode to the same packet.

#![no_main]

use boot_services::tftp::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|datagram: &[u8]| {
    let Ok(packet) = Packet::decode(datagram) else {
        return;
    };
    let mut encoded = Vec::new();
    packet.encode(&mut encoded);
    match Packet::decode(&encoded) {
        Ok(decoded_again) => assert_eq!(decoded_again, packet, "re-decoded packet differs"),
        Err(error) => panic!("encoding of {packet:?} does not decode: {error}"),
    }
});
