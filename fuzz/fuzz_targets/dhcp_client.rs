//! Replies to the agent's DHCP client: any bytes, in any state, never panic, and whatever the
//! client then sends decodes as a DHCP message.
#![no_main]

use std::time::{Duration, Instant};

use boot_services::dhcp::client::{DhcpClient, DhcpClientConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut client = DhcpClient::new(DhcpClientConfig::new([0x52, 0x54, 0, 0, 0, 1]), start, 1);
    client.handle_timeout(start);
    let _ = client.poll_transmit();
    // Several replies in a row: the first may move the client on, the rest meet the new state.
    for (index, reply) in data.split(|byte| *byte == 0xff).take(4).enumerate() {
        let now = start + Duration::from_secs(index as u64);
        let _ = client.handle_datagram(now, reply);
        client.handle_timeout(now);
        while let Some(transmit) = client.poll_transmit() {
            assert!(boot_services::dhcp::decode_message(&transmit.bytes).is_ok());
        }
    }
});
