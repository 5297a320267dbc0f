//! Fuzz target: arbitrary client bytes, in arbitrary pieces, into an NBD server connection.
//!
//! Input layout: the first byte seeds how the rest is cut into `handle_input` calls and how
//! much output the simulated driver writes after each; the remaining bytes are the client's
//! byte stream. The driver behaves like a real one: it feeds input only while the connection
//! wants it and consumes output in uneven amounts.
//!
//! Checked: nothing panics; pending output stays below its bound (high-water mark plus one
//! reply); a connection that refuses input always has output to drain or is closed (no
//! deadlock); and the header decoders round-trip whatever they accept.
#![no_main]

use boot_services::BlockSource;
use boot_services::nbd::{
    NbdConfig, NbdConnection, OPTION_HEADER_BYTES, REQUEST_HEADER_BYTES, decode_info_option_data,
    decode_option_header, decode_request_header,
};
use boot_services::source::{MemoryFile, SourceError};
use libfuzzer_sys::fuzz_target;

/// Small limits so the fuzzer reaches every bound quickly.
const CONFIG: NbdConfig = NbdConfig {
    request_bytes_max: 64 * 1024,
    options_max: 16,
    option_data_bytes_max: 1024,
    output_bytes_high_water: 128 * 1024,
};
/// The most output that may ever be pending: the high-water mark, plus the largest single
/// reply (a full read), plus slack for option replies, which carry at most a few strings.
const OUTPUT_BYTES_BOUND: usize =
    CONFIG.output_bytes_high_water + CONFIG.request_bytes_max as usize + 64 * 1024;
/// Driver calls per input; each one either feeds, or drains, so this bounds the run.
const DRIVER_STEPS_MAX: usize = 1 << 20;

/// Two exports, like a boot server with a root image and an empty scratch device.
struct FuzzExports {
    disk: MemoryFile,
    empty: MemoryFile,
}

impl BlockSource for FuzzExports {
    type Export = MemoryFile;
    fn export_names(&self) -> Vec<String> {
        vec!["disk".to_owned(), "empty".to_owned()]
    }
    fn open_export(&self, name: &str) -> Result<MemoryFile, SourceError> {
        match name {
            "disk" | "" => Ok(self.disk.clone()),
            "empty" => Ok(self.empty.clone()),
            _ => Err(SourceError::NotFound),
        }
    }
    fn export_description(&self, name: &str) -> Option<String> {
        (name == "disk").then(|| "fuzz disk".to_owned())
    }
}

/// xorshift64: deterministic piece sizes from the seed byte.
struct Splitter {
    state: u64,
}

impl Splitter {
    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// Mostly small pieces (splitting headers), sometimes large ones.
    fn piece_bytes(&mut self) -> usize {
        let roll = self.next();
        match roll % 4 {
            0 => 1 + (roll >> 8) as usize % 4,
            1 | 2 => 1 + (roll >> 8) as usize % 64,
            _ => 1 + (roll >> 8) as usize % 100_000,
        }
    }
}

fn check_decoders(stream: &[u8]) {
    if let Ok(Some(header)) = decode_request_header(stream) {
        assert_eq!(header.encode().as_slice(), &stream[..REQUEST_HEADER_BYTES]);
    }
    if let Ok(Some(header)) = decode_option_header(stream) {
        assert_eq!(header.encode().as_slice(), &stream[..OPTION_HEADER_BYTES]);
        let data = &stream[OPTION_HEADER_BYTES..];
        let data_length_bytes = (header.data_length_bytes as usize).min(data.len());
        if let Ok(info) = decode_info_option_data(&data[..data_length_bytes]) {
            assert!(info.export_name.len() <= boot_services::nbd::STRING_BYTES_MAX);
            assert!(info.information_requests().count() <= data_length_bytes / 2);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    check_decoders(stream);

    let exports = FuzzExports {
        disk: MemoryFile::new((0..256 * 1024).map(|index| index as u8).collect::<Vec<u8>>()),
        empty: MemoryFile::new(Vec::new()),
    };
    let mut connection = NbdConnection::new(exports, CONFIG);
    let mut splitter = Splitter {
        state: 0x9e37_79b9_7f4a_7c15 ^ u64::from(seed),
    };
    let mut remaining = stream;
    for _ in 0..DRIVER_STEPS_MAX {
        assert!(connection.pending_output().len() <= OUTPUT_BYTES_BOUND);
        if connection.is_closed() {
            break;
        }
        if !remaining.is_empty() && connection.wants_input() {
            let piece_bytes = splitter.piece_bytes().min(remaining.len());
            let (piece, rest) = remaining.split_at(piece_bytes);
            remaining = rest;
            if connection.handle_input(piece).is_err() {
                // A real driver closes here; the connection must stay quiet afterwards.
                assert!(!connection.wants_input());
                assert!(connection.handle_input(b"more").is_err());
                break;
            }
            continue;
        }
        let pending_bytes = connection.pending_output().len();
        if pending_bytes == 0 {
            // Refusing input with nothing to send would stall the connection forever.
            assert!(remaining.is_empty() || connection.wants_input());
            break;
        }
        let written_bytes = if splitter.next().is_multiple_of(3) {
            pending_bytes
        } else {
            1 + splitter.next() as usize % pending_bytes
        };
        connection.consume_output(written_bytes);
    }
});
