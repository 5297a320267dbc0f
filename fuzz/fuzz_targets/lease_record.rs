//! Lease journal records: decoding never panics, and what decodes re-encodes to the same bytes.
#![no_main]

use boot_services::dhcp::LeaseChange;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(change) = LeaseChange::decode(data) {
        let mut encoded = Vec::new();
        change.encode(&mut encoded);
        assert_eq!(LeaseChange::decode(&encoded).as_ref(), Ok(&change));
    }
});
