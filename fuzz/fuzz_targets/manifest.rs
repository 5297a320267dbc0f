//! Manifests from peers: validated decoding never panics, and what decodes re-encodes to bytes
//! that decode to the same manifest with the same identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transfer::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::decode(data) {
        let (hash, encoded) = manifest.identity().expect("a decoded manifest encodes");
        let again = Manifest::decode(&encoded).expect("re-encoded manifest decodes");
        assert_eq!(again, manifest);
        assert_eq!(again.identity().expect("encodes").0, hash);
    }
});
