//! Whole-connection tests: client bytes in, server bytes out, compared byte for byte.
//!
//! The expected bytes are built from the protocol document's numbers written out again here,
//! not from the module's own constants and encoders, so a wrong constant cannot hide itself.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::source::MemoryFile;

// Numbers from the NBD protocol document.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_ERROR: u16 = 0x8001;
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
/// HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN.
const TRANSMISSION_FLAGS: u16 = 0x0107;
/// FIXED_NEWSTYLE | NO_ZEROES.
const CLIENT_FLAGS_ALL: u32 = 3;

const DISK_SIZE_BYTES: usize = 64 * 1024;
const EFI_SIZE_BYTES: usize = 4096;
const BROKEN_SIZE_BYTES: u64 = 8192;

// ---- an in-memory block source ----

#[derive(Debug, Clone)]
enum TestExport {
    Memory(MemoryFile),
    /// Every read fails with `error`.
    Failing {
        size_bytes: u64,
        error: SourceError,
    },
}

impl ReadAt for TestExport {
    fn size_bytes(&self) -> u64 {
        match self {
            Self::Memory(file) => file.size_bytes(),
            Self::Failing { size_bytes, .. } => *size_bytes,
        }
    }
    fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<usize, SourceError> {
        match self {
            Self::Memory(file) => file.read_at(offset, buffer),
            Self::Failing { error, .. } => Err(error.clone()),
        }
    }
}

#[derive(Debug, Default)]
struct TestExports {
    exports: BTreeMap<String, (TestExport, Option<String>)>,
}

impl TestExports {
    fn with(mut self, name: &str, export: TestExport, description: Option<&str>) -> Self {
        self.exports
            .insert(name.to_owned(), (export, description.map(str::to_owned)));
        self
    }
}

impl BlockSource for TestExports {
    type Export = TestExport;
    fn export_names(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }
    fn open_export(&self, name: &str) -> Result<TestExport, SourceError> {
        match self.exports.get(name) {
            Some((export, _)) => Ok(export.clone()),
            None => Err(SourceError::NotFound),
        }
    }
    fn export_description(&self, name: &str) -> Option<String> {
        self.exports
            .get(name)
            .and_then(|(_, description)| description.clone())
    }
}

fn disk_bytes() -> Vec<u8> {
    (0..DISK_SIZE_BYTES)
        .map(|index| (index * 7 + index / 251) as u8)
        .collect()
}

/// "disk" (64 KiB, described) and "efi" (4 KiB): the two exports that LIST shows.
fn two_exports() -> TestExports {
    TestExports::default()
        .with(
            "disk",
            TestExport::Memory(MemoryFile::new(disk_bytes())),
            Some("root image"),
        )
        .with(
            "efi",
            TestExport::Memory(MemoryFile::new(vec![0xefu8; EFI_SIZE_BYTES])),
            None,
        )
}

/// The two exports plus two whose reads fail.
fn all_exports() -> Arc<TestExports> {
    Arc::new(
        two_exports()
            .with(
                "corrupt",
                TestExport::Failing {
                    size_bytes: BROKEN_SIZE_BYTES,
                    error: SourceError::Corrupt,
                },
                None,
            )
            .with(
                "broken",
                TestExport::Failing {
                    size_bytes: BROKEN_SIZE_BYTES,
                    error: SourceError::Io("disk on fire".to_owned()),
                },
                None,
            ),
    )
}

// ---- client and server byte builders ----

fn be32(value: u32) -> [u8; 4] {
    value.to_be_bytes()
}

fn greeting() -> Vec<u8> {
    [&b"NBDMAGIC"[..], b"IHAVEOPT", &[0, 3]].concat()
}

fn client_flags(flags: u32) -> Vec<u8> {
    be32(flags).to_vec()
}

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    [
        &b"IHAVEOPT"[..],
        &be32(option),
        &be32(data.len() as u32),
        data,
    ]
    .concat()
}

fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    [
        &0x0003_e889_0455_65a9u64.to_be_bytes()[..],
        &be32(option),
        &be32(reply_type),
        &be32(data.len() as u32),
        data,
    ]
    .concat()
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO.
fn info_data(name: &str, information_requests: &[u16]) -> Vec<u8> {
    let mut data = [&be32(name.len() as u32)[..], name.as_bytes()].concat();
    data.extend_from_slice(&(information_requests.len() as u16).to_be_bytes());
    for information in information_requests {
        data.extend_from_slice(&information.to_be_bytes());
    }
    data
}

fn info_export_reply(option: u32, size_bytes: u64) -> Vec<u8> {
    let data = [
        &INFO_EXPORT.to_be_bytes()[..],
        &size_bytes.to_be_bytes(),
        &TRANSMISSION_FLAGS.to_be_bytes(),
    ]
    .concat();
    option_reply(option, REP_INFO, &data)
}

fn request(command_flags: u16, command: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    [
        &0x2560_9513u32.to_be_bytes()[..],
        &command_flags.to_be_bytes(),
        &command.to_be_bytes(),
        &handle.to_be_bytes(),
        &offset.to_be_bytes(),
        &be32(length),
    ]
    .concat()
}

fn read(handle: u64, offset: u64, length: u32) -> Vec<u8> {
    request(0, CMD_READ, handle, offset, length)
}

fn simple_reply(error: u32, handle: u64, data: &[u8]) -> Vec<u8> {
    [
        &0x6744_6698u32.to_be_bytes()[..],
        &be32(error),
        &handle.to_be_bytes(),
        data,
    ]
    .concat()
}

fn chunk(flags: u16, reply_type: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    [
        &0x668e_33efu32.to_be_bytes()[..],
        &flags.to_be_bytes(),
        &reply_type.to_be_bytes(),
        &handle.to_be_bytes(),
        &be32(payload.len() as u32),
        payload,
    ]
    .concat()
}

fn error_chunk(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let payload = [
        &be32(error)[..],
        &(message.len() as u16).to_be_bytes(),
        message.as_bytes(),
    ]
    .concat();
    chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, &payload)
}

fn data_chunk(handle: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let payload = [&offset.to_be_bytes()[..], data].concat();
    chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, &payload)
}

/// Client bytes and server bytes that take a connection into transmission on `name` with
/// NBD_OPT_GO, after NBD_OPT_STRUCTURED_REPLY if `structured`.
fn enter_transmission(name: &str, size_bytes: u64, structured: bool) -> (Vec<u8>, Vec<u8>) {
    let mut client = client_flags(CLIENT_FLAGS_ALL);
    let mut server = greeting();
    if structured {
        client.extend(option(OPT_STRUCTURED_REPLY, &[]));
        server.extend(option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    }
    client.extend(option(OPT_GO, &info_data(name, &[])));
    server.extend(info_export_reply(OPT_GO, size_bytes));
    server.extend(option_reply(OPT_GO, REP_ACK, &[]));
    (client, server)
}

fn enter_disk(structured: bool) -> (Vec<u8>, Vec<u8>) {
    enter_transmission("disk", DISK_SIZE_BYTES as u64, structured)
}

// ---- the driver and the check helper ----

/// How a session ended after all client bytes were fed and all output consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// Still serving.
    Open,
    /// Closed cleanly (abort, disconnect, refused export).
    Closed,
    /// Stopped by an error; the driver drops the connection.
    Failed(NbdError),
}

struct Fixture {
    source: Arc<TestExports>,
    config: NbdConfig,
}

impl Default for Fixture {
    fn default() -> Self {
        Self {
            source: all_exports(),
            config: NbdConfig::default(),
        }
    }
}

/// Feeds `pieces` one `handle_input` at a time, consuming all output after each; returns the
/// output and how the session ended.
fn run<'piece>(
    fixture: &Fixture,
    pieces: impl IntoIterator<Item = &'piece [u8]>,
) -> (Vec<u8>, End) {
    let mut connection = NbdConnection::new(Arc::clone(&fixture.source), fixture.config);
    let mut output = Vec::new();
    let mut failure = None;
    drain(&mut connection, &mut output);
    for piece in pieces {
        if let Err(error) = connection.handle_input(piece) {
            failure.get_or_insert(error);
        }
        drain(&mut connection, &mut output);
    }
    let end = match (failure, connection.is_closed()) {
        (Some(error), closed) => {
            assert!(closed, "a failed connection reports itself closed");
            End::Failed(error)
        }
        (None, true) => End::Closed,
        (None, false) => End::Open,
    };
    (output, end)
}

fn drain<S: BlockSource>(connection: &mut NbdConnection<S>, output: &mut Vec<u8>) {
    let pending = connection.pending_output();
    output.extend_from_slice(pending);
    let pending_bytes = pending.len();
    connection.consume_output(pending_bytes);
}

/// Drives a connection with `client` bytes (whole, in 7-byte pieces and byte by byte) and
/// asserts that each way yields exactly `expected_server` bytes and ends as `expected_end`.
fn check_with(fixture: &Fixture, client: &[u8], expected_server: &[u8], expected_end: End) {
    let whole = run(fixture, [client]);
    let sevens = run(fixture, client.chunks(7));
    let bytes = run(fixture, client.chunks(1));
    for (way, (output, end)) in [
        ("whole", whole),
        ("7-byte pieces", sevens),
        ("bytes", bytes),
    ] {
        assert_eq!(end, expected_end, "end of session, input fed {way}");
        assert!(
            output == expected_server,
            "server bytes differ, input fed {way}\n  got      {} bytes: {:02x?}\n  expected {} bytes: {:02x?}",
            output.len(),
            &output[..output.len().min(96)],
            expected_server.len(),
            &expected_server[..expected_server.len().min(96)],
        );
    }
}

fn check(client: &[u8], expected_server: &[u8], expected_end: End) {
    check_with(&Fixture::default(), client, expected_server, expected_end);
}

// ---- handshake ----

#[test]
fn greeting_is_sent_first() {
    check(&[], &greeting(), End::Open);
}

#[test]
fn unknown_client_flags_end_the_session() {
    check(
        &client_flags(1 << 2),
        &greeting(),
        End::Failed(NbdError::UnknownClientFlags { flags: 4 }),
    );
}

#[test]
fn export_name_with_no_zeroes_enters_transmission() {
    let client = [
        client_flags(CLIENT_FLAGS_ALL),
        option(OPT_EXPORT_NAME, b"efi"),
        read(1, 0, 4),
    ]
    .concat();
    let server = [
        greeting(),
        (EFI_SIZE_BYTES as u64).to_be_bytes().to_vec(),
        TRANSMISSION_FLAGS.to_be_bytes().to_vec(),
        simple_reply(0, 1, &[0xef; 4]),
    ]
    .concat();
    check(&client, &server, End::Open);
}

#[test]
fn export_name_without_no_zeroes_sends_124_zeroes() {
    let client = [client_flags(1), option(OPT_EXPORT_NAME, b"efi")].concat();
    let server = [
        greeting(),
        (EFI_SIZE_BYTES as u64).to_be_bytes().to_vec(),
        TRANSMISSION_FLAGS.to_be_bytes().to_vec(),
        vec![0; 124],
    ]
    .concat();
    check(&client, &server, End::Open);
    let mut connection = NbdConnection::new(all_exports(), NbdConfig::default());
    connection.handle_input(&client).unwrap();
    assert_eq!(connection.export_name(), Some("efi"));
}

#[test]
fn unknown_export_name_closes_without_reply() {
    let client = [
        client_flags(CLIENT_FLAGS_ALL),
        option(OPT_EXPORT_NAME, b"nope"),
        read(1, 0, 4),
    ]
    .concat();
    check(&client, &greeting(), End::Closed);
}

#[test]
fn go_answers_requested_information_then_serves() {
    let client = [
        client_flags(CLIENT_FLAGS_ALL),
        option(
            OPT_GO,
            &info_data("disk", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, 99]),
        ),
        read(7, 100, 3),
    ]
    .concat();
    let block_size = [
        &INFO_BLOCK_SIZE.to_be_bytes()[..],
        &be32(1),
        &be32(4096),
        &be32(32 * 1024 * 1024),
    ]
    .concat();
    let server = [
        greeting(),
        info_export_reply(OPT_GO, DISK_SIZE_BYTES as u64),
        option_reply(
            OPT_GO,
            REP_INFO,
            &[&INFO_NAME.to_be_bytes()[..], b"disk"].concat(),
        ),
        option_reply(
            OPT_GO,
            REP_INFO,
            &[&INFO_DESCRIPTION.to_be_bytes()[..], b"root image"].concat(),
        ),
        option_reply(OPT_GO, REP_INFO, &block_size),
        option_reply(OPT_GO, REP_ACK, &[]),
        simple_reply(0, 7, &disk_bytes()[100..103]),
    ]
    .concat();
    check(&client, &server, End::Open);
}

#[test]
fn go_for_unknown_export_is_refused_and_haggling_continues() {
    let client = [
        client_flags(CLIENT_FLAGS_ALL),
        option(OPT_GO, &info_data("nope", &[])),
        option(OPT_ABORT, &[]),
    ]
    .concat();
    let server = [
        greeting(),
        option_reply(OPT_GO, REP_ERR_UNKNOWN, b"export not found"),
        option_reply(OPT_ABORT, REP_ACK, &[]),
    ]
    .concat();
    check(&client, &server, End::Closed);
}

#[test]
fn malformed_go_data_is_invalid() {
    // The name length claims more bytes than the option carries.
    let mut data = info_data("disk", &[]);
    data[3] = 200;
    let client = [client_flags(CLIENT_FLAGS_ALL), option(OPT_GO, &data)].concat();
    let server = [
        greeting(),
        option_reply(
            OPT_GO,
            REP_ERR_INVALID,
            b"option data length does not match its contents",
        ),
    ]
    .concat();
    check(&client, &server, End::Open);
}

#[test]
fn info_describes_without_entering_transmission() {
    let client = [
        client_flags(CLIENT_FLAGS_ALL),
        option(OPT_INFO, &info_data("efi", &[INFO_DESCRIPTION])),
        option(OPT_GO, &info_data("disk", &[])),
        read(1, 0, 2),
    ]
    .concat();
    // "efi" has no description, so only the mandatory NBD_INFO_EXPORT is sent.
    let server = [
        greeting(),
        info_export_reply(OPT_INFO, EFI_SIZE_BYTES as u64),
        option_reply(OPT_INFO, REP_ACK, &[]),
        info_export_reply(OPT_GO, DISK_SIZE_BYTES as u64),
        option_reply(OPT_GO, REP_ACK, &[]),
        simple_reply(0, 1, &disk_bytes()[..2]),
    ]
    .concat();
    check(&client, &server, End::Open);
}

#[test]
fn list_shows_each_export_then_ack() {
    let fixture = Fixture {
        source: Arc::new(two_exports()),
        ..Fixture::default()
    };
    let client = [client_flags(CLIENT_FLAGS_ALL), option(OPT_LIST, &[])].concat();
    let server = [
        greeting(),
        option_reply(
            OPT_LIST,
            REP_SERVER,
            &[&be32(4)[..], b"disk", b"root image"].concat(),
        ),
        option_reply(OPT_LIST, REP_SERVER, &[&be32(3)[..], b"efi"].concat()),
        option_reply(OPT_LIST, REP_ACK, &[]),
    ]
    .concat();
    check_with(&fixture, &client, &server, End::Open);
}

#[test]
fn list_with_data_is_invalid() {
    let client = [client_flags(CLIENT_FLAGS_ALL), option(OPT_LIST, b"x")].concat();
    let server = [
        greeting(),
        option_reply(OPT_LIST, REP_ERR_INVALID, b"unexpected option data"),
    ]
    .concat();
    check(&client, &server, End::Open);
}

#[test]
fn abort_acks_then_closes_and_ignores_the_rest() {
    let client = [
        client_flags(CLIENT_FLAGS_ALL),
        option(OPT_ABORT, &[]),
        b"trailing garbage".to_vec(),
    ]
    .concat();
    let server = [greeting(), option_reply(OPT_ABORT, REP_ACK, &[])].concat();
    check(&client, &server, End::Closed);
}

#[test]
fn starttls_is_refused_and_go_still_works() {
    let (go_client, go_server) = enter_disk(false);
    let client = [
        client_flags(CLIENT_FLAGS_ALL),
        option(OPT_STARTTLS, &[]),
        go_client[4..].to_vec(),
    ]
    .concat();
    let server = [
        greeting(),
        option_reply(OPT_STARTTLS, REP_ERR_POLICY, b"tls is not supported"),
        go_server[greeting().len()..].to_vec(),
    ]
    .concat();
    check(&client, &server, End::Open);
}

#[test]
fn unknown_option_is_unsupported() {
    let client = [client_flags(CLIENT_FLAGS_ALL), option(42, b"whatever")].concat();
    let server = [greeting(), option_reply(42, REP_ERR_UNSUP, &[])].concat();
    check(&client, &server, End::Open);
}

#[test]
fn oversized_option_data_is_skipped_and_refused() {
    let client = [
        client_flags(CLIENT_FLAGS_ALL),
        option(42, &vec![0x55; 70_000]),
        option(OPT_LIST, &[]),
    ]
    .concat();
    let server = [
        greeting(),
        option_reply(42, REP_ERR_TOO_BIG, b"option data too large"),
        option_reply(OPT_LIST, REP_SERVER, &[&be32(6)[..], b"broken"].concat()),
        option_reply(OPT_LIST, REP_SERVER, &[&be32(7)[..], b"corrupt"].concat()),
        option_reply(
            OPT_LIST,
            REP_SERVER,
            &[&be32(4)[..], b"disk", b"root image"].concat(),
        ),
        option_reply(OPT_LIST, REP_SERVER, &[&be32(3)[..], b"efi"].concat()),
        option_reply(OPT_LIST, REP_ACK, &[]),
    ]
    .concat();
    check(&client, &server, End::Open);
}

#[test]
fn oversized_export_name_closes() {
    let client = [
        client_flags(CLIENT_FLAGS_ALL),
        option(OPT_EXPORT_NAME, &vec![b'a'; 70_000]),
    ]
    .concat();
    check(&client, &greeting(), End::Closed);
}

#[test]
fn option_flood_is_cut_off() {
    let options_max = NbdConfig::default().options_max;
    let mut client = client_flags(CLIENT_FLAGS_ALL);
    let mut server = greeting();
    for _ in 0..options_max {
        client.extend(option(42, &[]));
        server.extend(option_reply(42, REP_ERR_UNSUP, &[]));
    }
    client.extend(option(42, &[]));
    check(
        &client,
        &server,
        End::Failed(NbdError::TooManyOptions { options_max }),
    );
}

#[test]
fn bad_option_magic_is_an_error() {
    let mut bad = option(OPT_LIST, &[]);
    bad[0] = b'X';
    let client = [client_flags(CLIENT_FLAGS_ALL), bad].concat();
    check(
        &client,
        &greeting(),
        End::Failed(NbdError::BadOptionMagic {
            magic: u64::from_be_bytes(*b"XHAVEOPT"),
        }),
    );
}

// ---- transmission ----

#[test]
fn read_gets_a_simple_reply() {
    let (mut client, mut server) = enter_disk(false);
    client.extend(read(0x1122_3344_5566_7788, 4096, 1000));
    server.extend(simple_reply(
        0,
        0x1122_3344_5566_7788,
        &disk_bytes()[4096..5096],
    ));
    // The very last byte of the export.
    client.extend(read(2, DISK_SIZE_BYTES as u64 - 1, 1));
    server.extend(simple_reply(0, 2, &disk_bytes()[DISK_SIZE_BYTES - 1..]));
    check(&client, &server, End::Open);
}

#[test]
fn read_gets_a_structured_reply() {
    let (mut client, mut server) = enter_disk(true);
    client.extend(read(9, 512, 2048));
    server.extend(data_chunk(9, 512, &disk_bytes()[512..2560]));
    check(&client, &server, End::Open);
}

#[test]
fn empty_read_succeeds_without_data() {
    let (mut client, mut server) = enter_disk(false);
    client.extend(read(1, 10, 0));
    server.extend(simple_reply(0, 1, &[]));
    check(&client, &server, End::Open);

    let (mut client, mut server) = enter_disk(true);
    client.extend(read(1, 10, 0));
    server.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[]));
    check(&client, &server, End::Open);
}

#[test]
fn read_out_of_bounds_is_invalid() {
    let (mut client, mut server) = enter_disk(false);
    client.extend(read(1, DISK_SIZE_BYTES as u64 - 10, 11));
    server.extend(simple_reply(EINVAL, 1, &[]));
    client.extend(read(2, u64::MAX, 1));
    server.extend(simple_reply(EINVAL, 2, &[]));
    check(&client, &server, End::Open);

    let (mut client, mut server) = enter_disk(true);
    client.extend(read(1, DISK_SIZE_BYTES as u64, 1));
    server.extend(error_chunk(1, EINVAL, "read beyond the end of the export"));
    check(&client, &server, End::Open);
}

#[test]
fn read_longer_than_the_maximum_payload_is_invalid() {
    let (mut client, mut server) = enter_disk(false);
    client.extend(read(1, 0, 32 * 1024 * 1024 + 1));
    server.extend(simple_reply(EINVAL, 1, &[]));
    check(&client, &server, End::Open);

    let (mut client, mut server) = enter_disk(true);
    client.extend(read(1, 0, 32 * 1024 * 1024 + 1));
    server.extend(error_chunk(
        1,
        EINVAL,
        "read longer than the maximum payload",
    ));
    check(&client, &server, End::Open);
}

#[test]
fn read_with_unknown_flags_is_invalid() {
    let (mut client, mut server) = enter_disk(false);
    client.extend(request(1 << 9, CMD_READ, 1, 0, 4));
    server.extend(simple_reply(EINVAL, 1, &[]));
    // Defined flags (here FUA | DF) are harmless and ignored.
    client.extend(request(0b101, CMD_READ, 2, 0, 4));
    server.extend(simple_reply(0, 2, &disk_bytes()[..4]));
    check(&client, &server, End::Open);
}

#[test]
fn write_payload_is_skipped_and_refused() {
    let (mut client, mut server) = enter_disk(false);
    // A payload that looks like requests must not be parsed as requests.
    let payload: Vec<u8> = (0..40).flat_map(|_| read(666, 0, 1)).collect();
    client.extend(request(0, CMD_WRITE, 1, 0, payload.len() as u32));
    client.extend(&payload);
    server.extend(simple_reply(EPERM, 1, &[]));
    client.extend(read(2, 8, 8));
    server.extend(simple_reply(0, 2, &disk_bytes()[8..16]));
    client.extend(request(0, CMD_WRITE, 3, 0, 0));
    server.extend(simple_reply(EPERM, 3, &[]));
    check(&client, &server, End::Open);

    let (mut client, mut server) = enter_disk(true);
    client.extend(request(0, CMD_WRITE, 1, 0, 3));
    client.extend(b"abc");
    server.extend(error_chunk(1, EPERM, "export is read-only"));
    check(&client, &server, End::Open);
}

#[test]
fn write_payload_is_never_buffered() {
    let (client, _) = enter_disk(false);
    let mut connection = NbdConnection::new(all_exports(), NbdConfig::default());
    connection.handle_input(&client).unwrap();
    connection
        .handle_input(&request(0, CMD_WRITE, 1, 0, 4 * 1024 * 1024))
        .unwrap();
    let piece = vec![0u8; 1024 * 1024];
    for _ in 0..4 {
        connection.handle_input(&piece).unwrap();
        assert_eq!(connection.input.len(), 0);
        assert!(connection.wants_input());
    }
    assert!(
        connection
            .pending_output()
            .ends_with(&simple_reply(EPERM, 1, &[]))
    );
}

#[test]
fn oversized_write_payload_ends_the_session() {
    let (mut client, server) = enter_disk(false);
    client.extend(request(0, CMD_WRITE, 1, 0, 32 * 1024 * 1024 + 1));
    check(
        &client,
        &server,
        End::Failed(NbdError::WritePayloadTooLarge {
            length_bytes: 32 * 1024 * 1024 + 1,
            request_bytes_max: 32 * 1024 * 1024,
        }),
    );
}

#[test]
fn trim_and_write_zeroes_are_refused() {
    let (mut client, mut server) = enter_disk(false);
    client.extend(request(0, CMD_TRIM, 1, 0, 4096));
    server.extend(simple_reply(EPERM, 1, &[]));
    client.extend(request(0, CMD_WRITE_ZEROES, 2, 0, 4096));
    server.extend(simple_reply(EPERM, 2, &[]));
    check(&client, &server, End::Open);
}

#[test]
fn flush_succeeds() {
    let (mut client, mut server) = enter_disk(true);
    client.extend(request(0, CMD_FLUSH, 5, 0, 0));
    server.extend(simple_reply(0, 5, &[]));
    check(&client, &server, End::Open);
}

#[test]
fn block_status_and_unknown_commands_are_invalid() {
    let (mut client, mut server) = enter_disk(false);
    client.extend(request(0, CMD_BLOCK_STATUS, 1, 0, 4096));
    server.extend(simple_reply(EINVAL, 1, &[]));
    client.extend(request(0, 0x4242, 2, 0, 0));
    server.extend(simple_reply(EINVAL, 2, &[]));
    check(&client, &server, End::Open);
}

#[test]
fn disconnect_closes_after_earlier_replies() {
    let (mut client, mut server) = enter_disk(false);
    client.extend(read(1, 0, 16));
    server.extend(simple_reply(0, 1, &disk_bytes()[..16]));
    client.extend(request(0, CMD_DISC, 2, 0, 0));
    client.extend(read(3, 0, 16));
    check(&client, &server, End::Closed);
}

#[test]
fn corrupt_or_failing_source_gives_eio_and_no_data() {
    let (mut client, mut server) = enter_transmission("corrupt", BROKEN_SIZE_BYTES, false);
    client.extend(read(1, 0, 4096));
    server.extend(simple_reply(EIO, 1, &[]));
    check(&client, &server, End::Open);

    let (mut client, mut server) = enter_transmission("broken", BROKEN_SIZE_BYTES, true);
    client.extend(read(1, 4096, 4096));
    server.extend(error_chunk(1, EIO, "read failed"));
    client.extend(request(0, CMD_FLUSH, 2, 0, 0));
    server.extend(simple_reply(0, 2, &[]));
    check(&client, &server, End::Open);
}

#[test]
fn bad_request_magic_is_an_error() {
    let (mut client, server) = enter_disk(false);
    let mut bad = read(1, 0, 1);
    bad[0] = 0x12;
    client.extend(bad);
    check(
        &client,
        &server,
        End::Failed(NbdError::BadRequestMagic { magic: 0x1260_9513 }),
    );
}

// ---- framing, flow control and the decoders ----

/// A session touching every kind of message and reply.
fn busy_session() -> (Vec<u8>, Vec<u8>) {
    let (mut client, mut server) = enter_disk(true);
    client.extend(read(1, 3, 700));
    server.extend(data_chunk(1, 3, &disk_bytes()[3..703]));
    client.extend(request(0, CMD_WRITE, 2, 0, 100));
    client.extend([0x25; 100]);
    server.extend(error_chunk(2, EPERM, "export is read-only"));
    client.extend(request(0, CMD_FLUSH, 3, 0, 0));
    server.extend(simple_reply(0, 3, &[]));
    client.extend(read(4, DISK_SIZE_BYTES as u64, 1));
    server.extend(error_chunk(4, EINVAL, "read beyond the end of the export"));
    client.extend(request(0, CMD_DISC, 5, 0, 0));
    (client, server)
}

#[test]
fn input_split_at_every_boundary_gives_the_same_output() {
    let (client, server) = busy_session();
    let fixture = Fixture::default();
    for split in 0..=client.len() {
        let (output, end) = run(&fixture, [&client[..split], &client[split..]]);
        assert_eq!(end, End::Closed, "split at {split}");
        assert!(output == server, "split at {split}");
    }
    check(&client, &server, End::Closed);
}

#[test]
fn output_high_water_holds_requests_until_output_is_consumed() {
    let config = NbdConfig {
        output_bytes_high_water: 10_000,
        ..NbdConfig::default()
    };
    let mut connection = NbdConnection::new(all_exports(), config);
    let (mut client, mut server) = enter_disk(false);
    for handle in 0..5u64 {
        client.extend(read(handle, handle * 4096, 4096));
        let start = handle as usize * 4096;
        server.extend(simple_reply(0, handle, &disk_bytes()[start..start + 4096]));
    }
    connection.handle_input(&client).unwrap();
    // Three replies reach the mark; the other two requests wait.
    let reply_bytes = 16 + 4096;
    let handshake_bytes = server.len() - 5 * reply_bytes;
    assert_eq!(
        connection.pending_output().len(),
        handshake_bytes + 3 * reply_bytes
    );
    assert_eq!(connection.input.len(), 2 * 28);
    // Consuming in small pieces releases the held requests.
    let mut output = Vec::new();
    while !connection.pending_output().is_empty() {
        let piece = connection.pending_output().len().min(1000);
        output.extend_from_slice(&connection.pending_output()[..piece]);
        connection.consume_output(piece);
    }
    assert!(output == server);
    assert_eq!(connection.input.len(), 0);
}

#[test]
fn wants_input_turns_false_while_held_input_is_large() {
    let config = NbdConfig {
        output_bytes_high_water: 1,
        ..NbdConfig::default()
    };
    let mut connection = NbdConnection::new(all_exports(), config);
    let (client, _) = enter_disk(false);
    connection.handle_input(&client).unwrap();
    let flush_count = INPUT_BYTES_HIGH_WATER_MIN / 28 + 10;
    let flushes: Vec<u8> = (0..flush_count as u64)
        .flat_map(|handle| request(0, CMD_FLUSH, handle, 0, 0))
        .collect();
    connection.handle_input(&flushes).unwrap();
    assert!(!connection.wants_input());
    let mut replies = 0;
    let mut output = Vec::new();
    while !connection.pending_output().is_empty() {
        output.extend_from_slice(connection.pending_output());
        connection.consume_output(connection.pending_output().len());
        replies += 1;
    }
    assert!(connection.wants_input());
    assert!(replies > flush_count);
    assert!(output.ends_with(&simple_reply(0, flush_count as u64 - 1, &[])));
}

#[test]
fn error_found_while_releasing_held_input_is_reported() {
    let config = NbdConfig {
        output_bytes_high_water: 1,
        ..NbdConfig::default()
    };
    let mut connection = NbdConnection::new(all_exports(), config);
    let (client, _) = enter_disk(false);
    connection.handle_input(&client).unwrap();
    connection.handle_input(&[0u8; 28]).unwrap();
    while !connection.pending_output().is_empty() {
        connection.consume_output(connection.pending_output().len());
    }
    let expected = NbdError::BadRequestMagic { magic: 0 };
    assert_eq!(connection.error(), Some(&expected));
    assert!(connection.is_closed());
    assert!(!connection.wants_input());
    assert_eq!(connection.handle_input(&[1]), Err(expected));
}

#[test]
fn source_can_be_borrowed() {
    let exports = two_exports();
    let mut connection = NbdConnection::new(&exports, NbdConfig::default());
    connection.handle_input(&enter_disk(false).0).unwrap();
    assert_eq!(connection.export_name(), Some("disk"));
}

#[test]
fn request_header_decodes_only_when_whole_and_round_trips() {
    let bytes = request(3, CMD_READ, 0xdead_beef, 1 << 40, 512);
    for length in 0..bytes.len() {
        assert_eq!(decode_request_header(&bytes[..length]), Ok(None));
    }
    let header = decode_request_header(&bytes).unwrap().unwrap();
    assert_eq!(
        header,
        RequestHeader {
            command_flags: 3,
            command: Command::Read,
            handle: 0xdead_beef,
            offset_bytes: 1 << 40,
            length_bytes: 512,
        }
    );
    assert_eq!(header.encode().to_vec(), bytes);
    assert_eq!(
        decode_request_header(&[0u8; 28]),
        Err(NbdError::BadRequestMagic { magic: 0 })
    );
}

#[test]
fn option_header_decodes_only_when_whole_and_round_trips() {
    let bytes = option(OPT_GO, &[]);
    for length in 0..bytes.len() {
        assert_eq!(decode_option_header(&bytes[..length]), Ok(None));
    }
    let header = decode_option_header(&bytes).unwrap().unwrap();
    assert_eq!(
        header,
        OptionHeader {
            option: OPT_GO,
            data_length_bytes: 0
        }
    );
    assert_eq!(header.encode().to_vec(), bytes);
}

#[test]
fn info_option_data_is_validated() {
    let data = info_data("disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
    let decoded = decode_info_option_data(&data).unwrap();
    assert_eq!(decoded.export_name, "disk");
    assert_eq!(
        decoded.information_requests().collect::<Vec<_>>(),
        [INFO_NAME, INFO_BLOCK_SIZE]
    );
    assert_eq!(
        decode_info_option_data(&data[..3]),
        Err(OptionDataError::TooShort)
    );
    assert_eq!(
        decode_info_option_data(&data[..data.len() - 1]),
        Err(OptionDataError::LengthMismatch)
    );
    assert_eq!(
        decode_info_option_data(&[&data[..], &[0]].concat()),
        Err(OptionDataError::LengthMismatch)
    );
    assert_eq!(
        decode_info_option_data(&info_data(&"n".repeat(4097), &[])),
        Err(OptionDataError::NameTooLong)
    );
    assert_eq!(
        decode_info_option_data(&[&be32(1)[..], &[0xff], &[0, 0]].concat()),
        Err(OptionDataError::NameNotUtf8)
    );
}
