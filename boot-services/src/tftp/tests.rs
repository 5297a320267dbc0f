//! Whole transfers in virtual time: requests go in as bytes, every packet the server sends is
//! described as one line (`DATA 3 512`, `OACK blksize=8 tsize=20`, `ERROR 1 file not found`) and
//! compared with the expected lines.

#![expect(clippy::panic, reason = "a test fails by panicking")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::source::{FileSource, MemoryFile, ReadAt, SourceError};

const FILENAME: &str = "boot/vmlinuz";

/// Options as a client sends them: name and value.
type OptionList<'a> = &'a [(&'a str, &'a str)];

/// A file that may start failing from some offset on, to test failures mid-transfer.
#[derive(Debug, Clone)]
struct TestFile {
    content: MemoryFile,
    fails_from_offset_bytes: Option<(u64, SourceError)>,
}

impl ReadAt for TestFile {
    fn size_bytes(&self) -> u64 {
        self.content.size_bytes()
    }
    fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<usize, SourceError> {
        if let Some((fails_from_offset_bytes, error)) = &self.fails_from_offset_bytes
            && offset + buffer.len() as u64 > *fails_from_offset_bytes
        {
            return Err(error.clone());
        }
        self.content.read_at(offset, buffer)
    }
}

/// Paths mapped to files or to the error opening them gives; anything else is not found.
#[derive(Debug, Default)]
struct TestSource {
    files: BTreeMap<String, Result<TestFile, SourceError>>,
}

impl TestSource {
    fn with_file(path: &str, content: Vec<u8>) -> Self {
        let mut source = Self::default();
        source.add_file(path, content, None);
        source
    }

    fn add_file(&mut self, path: &str, content: Vec<u8>, fails: Option<(u64, SourceError)>) {
        self.files.insert(
            path.to_owned(),
            Ok(TestFile {
                content: MemoryFile::new(content),
                fails_from_offset_bytes: fails,
            }),
        );
    }
}

impl FileSource for TestSource {
    type File = TestFile;
    fn open(&self, path: &str) -> Result<TestFile, SourceError> {
        self.files
            .get(path)
            .cloned()
            .unwrap_or(Err(SourceError::NotFound))
    }
}

/// Deterministic content in which every block differs from its neighbours.
fn file_content(size_bytes: usize) -> Vec<u8> {
    (0..size_bytes)
        .map(|position| (position % 251) as u8 ^ (position / 4096) as u8)
        .collect()
}

/// The origin of virtual time; the only clock read in these tests, and nothing depends on its
/// value.
#[expect(
    clippy::disallowed_methods,
    reason = "an Instant can only be made from the clock; the sessions never read it"
)]
fn virtual_start() -> Instant {
    Instant::now()
}

fn peer() -> SocketAddr {
    "192.0.2.10:2000".parse().unwrap()
}

fn encode(packet: &Packet<'_>) -> Vec<u8> {
    let mut datagram = Vec::new();
    packet.encode(&mut datagram);
    datagram
}

fn read_request(filename: &str, mode: TransferMode, options: &[(&str, &str)]) -> Vec<u8> {
    encode(&Packet::ReadRequest {
        filename,
        mode,
        options: options
            .iter()
            .map(|(name, value)| TftpOption { name, value })
            .collect(),
    })
}

fn ack(block: u16) -> Vec<u8> {
    encode(&Packet::Ack { block })
}

/// One line per packet, as compared in the scenarios.
fn describe(datagram: &[u8]) -> String {
    match Packet::decode(datagram) {
        Ok(Packet::Data { block, data }) => format!("DATA {block} {}", data.len()),
        Ok(Packet::OptionAck { options }) => {
            let mut line = "OACK".to_owned();
            for option in options {
                line.push_str(&format!(" {}={}", option.name, option.value));
            }
            line
        }
        Ok(Packet::Error { code, message }) => format!("ERROR {code} {message}"),
        Ok(other) => format!("{other:?}"),
        Err(error) => format!("undecodable: {error}"),
    }
}

fn drain(session: &mut TftpSession<TestFile>) -> Vec<String> {
    let mut lines = Vec::new();
    while let Some(datagram) = session.poll_transmit() {
        lines.push(describe(datagram));
    }
    lines
}

fn start(
    source: &TestSource,
    config: &TftpConfig,
    now: Instant,
    request: &[u8],
) -> TftpSession<TestFile> {
    match handle_request(source, config, now, peer(), request, 0) {
        RequestOutcome::Session(session) => session,
        other => panic!("expected a session, got {other:?}"),
    }
}

/// What the client does in one step of a scenario.
#[derive(Debug, Clone, Copy)]
enum Step {
    Ack(u16),
    ClientError(u16),
    Raw(&'static [u8]),
    /// Advance the virtual clock to the session's deadline and fire the timer.
    Timeout,
    /// Fire the timer a little before the deadline.
    EarlyTimeout,
}

/// Runs a read request for a file of `file_size_bytes` and then `steps`, checking the lines the
/// server sends after the request (`first_sent`) and after each step, and the final outcome.
fn check(
    config: TftpConfig,
    file_size_bytes: usize,
    options: &[(&str, &str)],
    first_sent: &[&str],
    steps: &[(Step, &[&str])],
    expected_outcome: Option<SessionOutcome>,
) {
    let source = TestSource::with_file(FILENAME, file_content(file_size_bytes));
    let mut now = virtual_start();
    let request = read_request(FILENAME, TransferMode::Octet, options);
    let mut session = start(&source, &config, now, &request);
    assert_eq!(drain(&mut session), first_sent, "after the request");
    for (step_number, (step, expected_sent)) in steps.iter().enumerate() {
        match step {
            Step::Ack(block) => {
                now += Duration::from_millis(1);
                session.handle_datagram(now, &ack(*block));
            }
            Step::ClientError(code) => {
                now += Duration::from_millis(1);
                let datagram = encode(&Packet::Error {
                    code: *code,
                    message: "client gives up",
                });
                session.handle_datagram(now, &datagram);
            }
            Step::Raw(datagram) => {
                now += Duration::from_millis(1);
                session.handle_datagram(now, datagram);
            }
            Step::Timeout => {
                now = session
                    .poll_timeout()
                    .expect("a running session has a deadline");
                session.handle_timeout(now);
            }
            Step::EarlyTimeout => {
                let deadline = session
                    .poll_timeout()
                    .expect("a running session has a deadline");
                session.handle_timeout(deadline - Duration::from_millis(1));
            }
        }
        assert_eq!(
            drain(&mut session),
            *expected_sent,
            "after step {step_number}: {step:?}"
        );
    }
    assert_eq!(session.outcome(), expected_outcome);
    if expected_outcome.is_some() {
        assert_eq!(
            session.poll_timeout(),
            None,
            "a finished session has no timer"
        );
    }
}

fn small_blocks() -> TftpConfig {
    TftpConfig::default()
}

#[test]
fn plain_read_request_uses_512_byte_blocks_and_no_oack() {
    check(
        small_blocks(),
        1000,
        &[],
        &["DATA 1 512"],
        &[(Step::Ack(1), &["DATA 2 488"]), (Step::Ack(2), &[])],
        Some(SessionOutcome::Completed { bytes: 1000 }),
    );
}

#[test]
fn blksize_and_tsize_are_acknowledged_and_data_waits_for_ack_zero() {
    check(
        small_blocks(),
        20,
        &[("blksize", "8"), ("tsize", "0")],
        &["OACK blksize=8 tsize=20"],
        &[
            // DATA before ACK 0 would break clients that refuse the OACK.
            (Step::Ack(1), &[]),
            (Step::Ack(0), &["DATA 1 8"]),
            (Step::Ack(1), &["DATA 2 8"]),
            (Step::Ack(2), &["DATA 3 4"]),
            (Step::Ack(3), &[]),
        ],
        Some(SessionOutcome::Completed { bytes: 20 }),
    );
}

#[test]
fn lost_oack_is_retransmitted() {
    check(
        small_blocks(),
        5,
        &[("tsize", "0")],
        &["OACK tsize=5"],
        &[
            (Step::Timeout, &["OACK tsize=5"]),
            (Step::Ack(0), &["DATA 1 5"]),
            (Step::Ack(1), &[]),
        ],
        Some(SessionOutcome::Completed { bytes: 5 }),
    );
}

/// One request per row: the options sent, the configuration, and the OACK line expected (or
/// the first DATA line when nothing is acknowledged).
#[test]
fn options_are_negotiated_clamped_or_ignored() {
    let limited = TftpConfig {
        blksize_max: 1468,
        windowsize_max: 16,
        ..TftpConfig::default()
    };
    let cases: &[(OptionList<'_>, &TftpConfig, &str)] = &[
        (&[("blksize", "1468")], &limited, "OACK blksize=1468"),
        (&[("blksize", "65464")], &limited, "OACK blksize=1468"),
        (&[("BLKSIZE", "100000")], &limited, "OACK blksize=1468"),
        (&[("blksize", "7")], &limited, "DATA 1 512"),
        (&[("blksize", "abc")], &limited, "DATA 1 512"),
        (&[("blksize", "-8")], &limited, "DATA 1 512"),
        (&[("windowsize", "64")], &limited, "OACK windowsize=16"),
        (&[("windowsize", "0")], &limited, "DATA 1 512"),
        (&[("windowsize", "65536")], &limited, "DATA 1 512"),
        (&[("timeout", "3")], &limited, "OACK timeout=3"),
        (&[("timeout", "0")], &limited, "DATA 1 512"),
        (&[("timeout", "256")], &limited, "DATA 1 512"),
        (&[("tsize", "0")], &limited, "OACK tsize=3000"),
        (&[("tsize", "12")], &limited, "DATA 1 512"),
        (&[("multicast", "")], &limited, "DATA 1 512"),
        (
            &[("utimeout", "5000"), ("tsize", "0")],
            &limited,
            "OACK tsize=3000",
        ),
        (
            &[("windowsize", "4"), ("tsize", "0"), ("blksize", "1024")],
            &limited,
            "OACK windowsize=4 tsize=3000 blksize=1024",
        ),
    ];
    let source = TestSource::with_file(FILENAME, file_content(3000));
    for (options, config, expected_first) in cases {
        let request = read_request(FILENAME, TransferMode::Octet, options);
        let mut session = start(&source, config, virtual_start(), &request);
        assert_eq!(
            drain(&mut session),
            [*expected_first],
            "options {options:?}"
        );
    }
}

#[test]
fn negotiated_timeout_drives_the_retransmission_timer() {
    let source = TestSource::with_file(FILENAME, file_content(10));
    let now = virtual_start();
    let request = read_request(FILENAME, TransferMode::Octet, &[("timeout", "7")]);
    let session = start(&source, &TftpConfig::default(), now, &request);
    assert_eq!(session.poll_timeout(), Some(now + Duration::from_secs(7)));
}

#[test]
fn windows_slide_on_the_last_ack_and_are_resent_on_timeout() {
    // Ten blocks of 8 bytes and a final one of 3.
    check(
        small_blocks(),
        83,
        &[("blksize", "8"), ("windowsize", "4")],
        &["OACK blksize=8 windowsize=4"],
        &[
            (
                Step::Ack(0),
                &["DATA 1 8", "DATA 2 8", "DATA 3 8", "DATA 4 8"],
            ),
            (
                Step::Ack(4),
                &["DATA 5 8", "DATA 6 8", "DATA 7 8", "DATA 8 8"],
            ),
            (
                Step::Timeout,
                &["DATA 5 8", "DATA 6 8", "DATA 7 8", "DATA 8 8"],
            ),
            (Step::Ack(8), &["DATA 9 8", "DATA 10 8", "DATA 11 3"]),
            (Step::Ack(11), &[]),
        ],
        Some(SessionOutcome::Completed { bytes: 83 }),
    );
}

#[test]
fn partial_window_ack_resends_from_the_block_after_it() {
    check(
        small_blocks(),
        83,
        &[("blksize", "8"), ("windowsize", "4")],
        &["OACK blksize=8 windowsize=4"],
        &[
            (
                Step::Ack(0),
                &["DATA 1 8", "DATA 2 8", "DATA 3 8", "DATA 4 8"],
            ),
            // Block 3 was lost: the client acknowledges 2 and the next window starts at 3.
            (
                Step::Ack(2),
                &["DATA 3 8", "DATA 4 8", "DATA 5 8", "DATA 6 8"],
            ),
            (
                Step::Ack(6),
                &["DATA 7 8", "DATA 8 8", "DATA 9 8", "DATA 10 8"],
            ),
            (Step::Ack(9), &["DATA 10 8", "DATA 11 3"]),
            (Step::Ack(11), &[]),
        ],
        Some(SessionOutcome::Completed { bytes: 83 }),
    );
}

#[test]
fn duplicate_stale_and_future_acks_are_ignored() {
    check(
        small_blocks(),
        83,
        &[("blksize", "8"), ("windowsize", "4")],
        &["OACK blksize=8 windowsize=4"],
        &[
            (
                Step::Ack(0),
                &["DATA 1 8", "DATA 2 8", "DATA 3 8", "DATA 4 8"],
            ),
            (Step::Ack(0), &[]),
            (
                Step::Ack(4),
                &["DATA 5 8", "DATA 6 8", "DATA 7 8", "DATA 8 8"],
            ),
            // The duplicate ACK of 4 must not resend the window (Sorcerer's Apprentice).
            (Step::Ack(4), &[]),
            (Step::Ack(2), &[]),
            (Step::Ack(9), &[]),
            (Step::Ack(60000), &[]),
            (Step::Ack(8), &["DATA 9 8", "DATA 10 8", "DATA 11 3"]),
            (Step::Ack(8), &[]),
            (Step::Ack(11), &[]),
        ],
        Some(SessionOutcome::Completed { bytes: 83 }),
    );
}

#[test]
fn file_of_exact_multiple_of_blksize_ends_with_an_empty_block() {
    check(
        small_blocks(),
        1024,
        &[],
        &["DATA 1 512"],
        &[
            (Step::Ack(1), &["DATA 2 512"]),
            (Step::Ack(2), &["DATA 3 0"]),
            (Step::Ack(3), &[]),
        ],
        Some(SessionOutcome::Completed { bytes: 1024 }),
    );
}

#[test]
fn empty_file_is_one_empty_block() {
    check(
        small_blocks(),
        0,
        &[("tsize", "0")],
        &["OACK tsize=0"],
        &[(Step::Ack(0), &["DATA 1 0"]), (Step::Ack(1), &[])],
        Some(SessionOutcome::Completed { bytes: 0 }),
    );
}

#[test]
fn retries_exhausted_end_the_session_as_timed_out() {
    let config = TftpConfig {
        retries_max: 2,
        ..TftpConfig::default()
    };
    check(
        config,
        1000,
        &[],
        &["DATA 1 512"],
        &[
            (Step::EarlyTimeout, &[]),
            (Step::Timeout, &["DATA 1 512"]),
            (Step::Timeout, &["DATA 1 512"]),
            (Step::Timeout, &[]),
        ],
        Some(SessionOutcome::TimedOut),
    );
}

#[test]
fn progress_resets_the_retry_count() {
    let config = TftpConfig {
        retries_max: 1,
        ..TftpConfig::default()
    };
    check(
        config,
        1500,
        &[],
        &["DATA 1 512"],
        &[
            (Step::Timeout, &["DATA 1 512"]),
            (Step::Ack(1), &["DATA 2 512"]),
            (Step::Timeout, &["DATA 2 512"]),
            (Step::Ack(2), &["DATA 3 476"]),
            (Step::Ack(3), &[]),
        ],
        Some(SessionOutcome::Completed { bytes: 1500 }),
    );
}

#[test]
fn client_error_ends_the_session_silently() {
    check(
        small_blocks(),
        1000,
        &[("tsize", "0")],
        &["OACK tsize=1000"],
        &[(
            Step::ClientError(error_code::OPTION_NEGOTIATION_FAILED),
            &[],
        )],
        Some(SessionOutcome::ClientError {
            code: 8,
            message: "client gives up".to_owned(),
        }),
    );
}

#[test]
fn malformed_client_error_still_ends_the_session() {
    check(
        small_blocks(),
        1000,
        &[],
        &["DATA 1 512"],
        // Latin-1 text and no terminator.
        &[(Step::Raw(b"\x00\x05\x00\x00abgebrochen \xe9"), &[])],
        Some(SessionOutcome::ClientError {
            code: 0,
            message: "abgebrochen \u{fffd}".to_owned(),
        }),
    );
}

#[test]
fn garbage_and_misplaced_packets_do_not_disturb_a_session() {
    check(
        small_blocks(),
        1000,
        &[],
        &["DATA 1 512"],
        &[
            (Step::Raw(b""), &[]),
            (Step::Raw(b"\x00"), &[]),
            (Step::Raw(b"\x00\x04\x00"), &[]),
            (Step::Raw(b"\x00\x04\x00\x01\x00"), &[]),
            (Step::Raw(b"\x00\x09garbage"), &[]),
            (Step::Raw(b"\x00\x03\x00\x01data"), &[]),
            (Step::Raw(b"\x00\x01other\x00octet\x00"), &[]),
            (Step::Raw(b"\x00\x06tsize\x000\x00"), &[]),
            (Step::Ack(1), &["DATA 2 488"]),
            (Step::Ack(2), &[]),
            // Nothing is answered once finished.
            (Step::Ack(2), &[]),
        ],
        Some(SessionOutcome::Completed { bytes: 1000 }),
    );
}

#[test]
fn read_failure_mid_transfer_sends_an_error_and_ends_the_session() {
    // Each row: the error the file starts giving at offset 1024, and the ERROR line sent.
    let cases = [
        (SourceError::Corrupt, "ERROR 0 stored data is corrupt"),
        (
            SourceError::Io("disk /dev/sda5 on fire".to_owned()),
            "ERROR 0 i/o error",
        ),
        (SourceError::NotFound, "ERROR 1 file not found"),
    ];
    for (error, expected_line) in cases {
        let mut source = TestSource::default();
        source.add_file(FILENAME, file_content(3000), Some((1024, error.clone())));
        let now = virtual_start();
        let request = read_request(FILENAME, TransferMode::Octet, &[("windowsize", "4")]);
        let mut session = start(&source, &TftpConfig::default(), now, &request);
        assert_eq!(drain(&mut session), ["OACK windowsize=4"]);
        session.handle_datagram(now, &ack(0));
        // Blocks 1 and 2 are readable; block 3 (offset 1024) is not and is never sent.
        assert_eq!(
            drain(&mut session),
            ["DATA 1 512", "DATA 2 512", expected_line]
        );
        assert_eq!(
            session.outcome(),
            Some(SessionOutcome::ReadFailed { error })
        );
        assert_eq!(session.poll_timeout(), None);
        session.handle_datagram(now, &ack(2));
        assert_eq!(drain(&mut session), Vec::<String>::new());
    }
}

#[test]
fn file_shorter_than_its_size_fails_instead_of_ending_early() {
    #[derive(Debug)]
    struct ShrunkFile;
    impl ReadAt for ShrunkFile {
        fn size_bytes(&self) -> u64 {
            2000
        }
        fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<usize, SourceError> {
            // Claims 2000 bytes but holds only 700.
            let available = 700u64.saturating_sub(offset) as usize;
            let count = available.min(buffer.len());
            buffer[..count].fill(7);
            Ok(count)
        }
    }
    struct ShrunkSource;
    impl FileSource for ShrunkSource {
        type File = ShrunkFile;
        fn open(&self, _path: &str) -> Result<ShrunkFile, SourceError> {
            Ok(ShrunkFile)
        }
    }
    let now = virtual_start();
    let request = read_request(FILENAME, TransferMode::Octet, &[]);
    let RequestOutcome::Session(mut session) = handle_request(
        &ShrunkSource,
        &TftpConfig::default(),
        now,
        peer(),
        &request,
        0,
    ) else {
        panic!("expected a session");
    };
    assert_eq!(describe(session.poll_transmit().unwrap()), "DATA 1 512");
    session.handle_datagram(now, &ack(1));
    assert_eq!(
        describe(session.poll_transmit().unwrap()),
        "ERROR 0 i/o error"
    );
    assert!(matches!(
        session.outcome(),
        Some(SessionOutcome::ReadFailed {
            error: SourceError::Io(_)
        })
    ));
}

/// Requests answered from the listening port, one per row: the datagram, how many sessions
/// run, and the ERROR line expected (`None`: ignored).
#[test]
fn requests_refused_or_ignored_on_the_listening_port() {
    let mut source = TestSource::with_file(FILENAME, file_content(100));
    source
        .files
        .insert("secret".to_owned(), Err(SourceError::AccessDenied));
    source
        .files
        .insert("rotten".to_owned(), Err(SourceError::Corrupt));
    let config = TftpConfig {
        sessions_max: 2,
        ..TftpConfig::default()
    };
    let octet = TransferMode::Octet;
    let cases: Vec<(Vec<u8>, usize, Option<&str>)> = vec![
        (
            encode(&Packet::WriteRequest {
                filename: FILENAME,
                mode: octet,
                options: Vec::new(),
            }),
            0,
            Some("ERROR 2 server is read-only"),
        ),
        (
            read_request("../etc/passwd", octet, &[]),
            0,
            Some("ERROR 2 access violation"),
        ),
        (
            read_request("boot/../../etc/passwd", octet, &[]),
            0,
            Some("ERROR 2 access violation"),
        ),
        (
            read_request("boot\\..\\x", octet, &[]),
            0,
            Some("ERROR 2 access violation"),
        ),
        (
            read_request("boot/\u{1b}x", octet, &[]),
            0,
            Some("ERROR 2 access violation"),
        ),
        (
            read_request("/", octet, &[]),
            0,
            Some("ERROR 1 file not found"),
        ),
        (
            read_request("missing", octet, &[]),
            0,
            Some("ERROR 1 file not found"),
        ),
        (
            read_request("secret", octet, &[]),
            0,
            Some("ERROR 2 access violation"),
        ),
        (
            read_request("rotten", octet, &[]),
            0,
            Some("ERROR 0 stored data is corrupt"),
        ),
        (
            read_request(FILENAME, octet, &[]),
            2,
            Some("ERROR 0 server busy"),
        ),
        (
            read_request(FILENAME, octet, &[]),
            7,
            Some("ERROR 0 server busy"),
        ),
        (
            read_request(FILENAME, TransferMode::Mail, &[]),
            0,
            Some("ERROR 4 mail mode is not supported"),
        ),
        (
            b"\x00\x01boot/vmlinuz\x00binary\x00".to_vec(),
            0,
            Some("ERROR 4 unsupported transfer mode"),
        ),
        (b"".to_vec(), 0, None),
        (b"\x00".to_vec(), 0, None),
        (b"\x00\x01".to_vec(), 0, None),
        (b"\x00\x01boot/vmlinuz".to_vec(), 0, None),
        (b"\x00\x01boot/vmlinuz\x00octet".to_vec(), 0, None),
        (b"\x00\x01boot/\xffvmlinuz\x00octet\x00".to_vec(), 0, None),
        (
            b"\x00\x01boot/vmlinuz\x00octet\x00blksize\x00".to_vec(),
            0,
            None,
        ),
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), 0, None),
        (
            vec![0, 1].into_iter().chain(vec![b'a'; 600]).collect(),
            0,
            None,
        ),
        (ack(1), 0, None),
        (
            encode(&Packet::Data {
                block: 1,
                data: b"x",
            }),
            0,
            None,
        ),
        (
            encode(&Packet::Error {
                code: 0,
                message: "x",
            }),
            0,
            None,
        ),
        (
            encode(&Packet::OptionAck {
                options: Vec::new(),
            }),
            0,
            None,
        ),
    ];
    for (datagram, active_sessions, expected) in cases {
        let outcome = handle_request(
            &source,
            &config,
            virtual_start(),
            peer(),
            &datagram,
            active_sessions,
        );
        let described = match outcome {
            RequestOutcome::Reply(reply) => Some(describe(&reply)),
            RequestOutcome::Ignore => None,
            RequestOutcome::Session(session) => Some(format!("session for {}", session.filename())),
        };
        assert_eq!(described.as_deref(), expected, "datagram {datagram:?}");
    }
}

#[test]
fn accepted_request_reports_normalised_name_peer_and_parameters() {
    let source = TestSource::with_file(FILENAME, file_content(100));
    let config = TftpConfig {
        sessions_max: 2,
        ..TftpConfig::default()
    };
    // Netascii is served as the file's bytes, like octet; uppercase names are accepted.
    let request = b"\x00\x01\\boot\\vmlinuz\x00NetASCII\x00BlkSize\x001000\x00\x00\x00";
    let RequestOutcome::Session(mut session) =
        handle_request(&source, &config, virtual_start(), peer(), request, 1)
    else {
        panic!("expected a session");
    };
    assert_eq!(session.filename(), FILENAME);
    assert_eq!(session.peer(), peer());
    assert_eq!(session.blksize_bytes(), 1000);
    assert_eq!(session.windowsize_blocks(), 1);
    assert_eq!(session.file_size_bytes(), 100);
    assert_eq!(drain(&mut session), ["OACK blksize=1000"]);
}

/// A well-behaved RFC 7440 client in virtual time: it acknowledges the last block it received
/// in order after each burst, and lets the server's timer handle bursts it lost entirely.
/// `lose` decides, by the number of the DATA packet sent, which packets the network drops.
struct Download {
    content: Vec<u8>,
    outcome: Option<SessionOutcome>,
    data_packets_sent: u64,
    saw_rollover: bool,
}

fn download(
    source: &TestSource,
    config: &TftpConfig,
    options: &[(&str, &str)],
    lose: impl Fn(u64) -> bool,
) -> Download {
    let mut now = virtual_start();
    let request = read_request(FILENAME, TransferMode::Octet, options);
    let mut session = start(source, config, now, &request);
    let mut content = Vec::new();
    let mut data_packets_sent = 0u64;
    let mut blksize_bytes = usize::from(BLKSIZE_DEFAULT_BYTES);
    let mut next_expected_block: u16 = 1;
    let mut last_in_order_block: u16 = 0;
    let mut saw_rollover = false;
    let mut finished_receiving = false;
    let mut buffer_address = None;
    // Bounds the test, not the server: every round makes progress or uses a retry.
    for _round in 0..10_000_000u64 {
        let mut delivered_any = false;
        let mut acknowledge = None;
        while let Some(datagram) = session.poll_transmit() {
            match Packet::decode(datagram).unwrap() {
                Packet::OptionAck { options } => {
                    for option in options {
                        if option.name == "blksize" {
                            blksize_bytes = option.value.parse().unwrap();
                        }
                    }
                    acknowledge = Some(0);
                }
                Packet::Data { block, data } => {
                    data_packets_sent += 1;
                    // Every DATA packet comes from the same buffer: no allocation per block.
                    let address = datagram.as_ptr();
                    assert_eq!(*buffer_address.get_or_insert(address), address);
                    if lose(data_packets_sent) {
                        continue;
                    }
                    delivered_any = true;
                    if block == next_expected_block && !finished_receiving {
                        if block == 0 {
                            saw_rollover = true;
                        }
                        content.extend_from_slice(data);
                        last_in_order_block = block;
                        next_expected_block = block.wrapping_add(1);
                        finished_receiving = data.len() < blksize_bytes;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if session.outcome().is_some() {
            break;
        }
        now += Duration::from_micros(100);
        if let Some(block) = acknowledge {
            session.handle_datagram(now, &ack(block));
        } else if delivered_any {
            session.handle_datagram(now, &ack(last_in_order_block));
        } else {
            now = session.poll_timeout().unwrap();
            session.handle_timeout(now);
        }
        if session.outcome().is_some() {
            break;
        }
    }
    Download {
        content,
        outcome: session.outcome(),
        data_packets_sent,
        saw_rollover,
    }
}

#[test]
fn block_numbers_roll_over_past_65535() {
    // 70_000 full blocks of 8 bytes and a final one of 5: the block number wraps once.
    let size_bytes = 70_000 * 8 + 5;
    let source = TestSource::with_file(FILENAME, file_content(size_bytes));
    for windowsize in ["1", "7", "16"] {
        let result = download(
            &source,
            &TftpConfig::default(),
            &[("blksize", "8"), ("windowsize", windowsize)],
            |_| false,
        );
        assert_eq!(
            result.outcome,
            Some(SessionOutcome::Completed {
                bytes: size_bytes as u64
            })
        );
        assert!(result.saw_rollover, "windowsize {windowsize}");
        assert_eq!(result.data_packets_sent, 70_001);
        assert!(
            result.content == file_content(size_bytes),
            "windowsize {windowsize}"
        );
    }
}

#[test]
fn lossy_windowed_transfer_across_the_rollover_delivers_the_exact_file() {
    let size_bytes = 66_000 * 8;
    let source = TestSource::with_file(FILENAME, file_content(size_bytes));
    let config = TftpConfig {
        retries_max: 3,
        ..TftpConfig::default()
    };
    let result = download(
        &source,
        &config,
        &[("blksize", "8"), ("windowsize", "8"), ("tsize", "0")],
        |packet_number| packet_number % 97 == 0 || packet_number % 1013 < 9,
    );
    assert_eq!(
        result.outcome,
        Some(SessionOutcome::Completed {
            bytes: size_bytes as u64
        })
    );
    assert!(result.saw_rollover);
    assert!(result.data_packets_sent > 66_001, "losses cause resends");
    assert!(result.content == file_content(size_bytes));
}

#[test]
fn windowed_transfer_with_typical_ethernet_blocks() {
    let size_bytes = 4 * 1024 * 1024 + 123;
    let source = TestSource::with_file(FILENAME, file_content(size_bytes));
    let result = download(
        &source,
        &TftpConfig::default(),
        &[("blksize", "1468"), ("windowsize", "16")],
        |_| false,
    );
    assert_eq!(
        result.outcome,
        Some(SessionOutcome::Completed {
            bytes: size_bytes as u64
        })
    );
    assert!(result.content == file_content(size_bytes));
}

/// The 64 MiB transfer of the performance target; slow in debug builds, so it runs only with
/// `BOOTMESH_SLOW_TESTS=1`.
#[test]
fn sixty_four_mebibytes_at_windowsize_16() {
    if std::env::var_os("BOOTMESH_SLOW_TESTS").is_none() {
        return;
    }
    let size_bytes = 64 * 1024 * 1024;
    let source = TestSource::with_file(FILENAME, file_content(size_bytes));
    let result = download(
        &source,
        &TftpConfig::default(),
        &[("blksize", "1468"), ("windowsize", "16")],
        |_| false,
    );
    assert_eq!(
        result.outcome,
        Some(SessionOutcome::Completed {
            bytes: size_bytes as u64
        })
    );
    assert!(result.content == file_content(size_bytes));
}

/// Decoding, one row per datagram: the packet expected, or the error.
#[test]
fn packets_decode_or_are_refused() {
    let cases: Vec<(&[u8], Result<Packet<'_>, PacketError>)> = vec![
        (
            b"\x00\x01pxelinux.0\x00octet\x00",
            Ok(Packet::ReadRequest {
                filename: "pxelinux.0",
                mode: TransferMode::Octet,
                options: Vec::new(),
            }),
        ),
        (
            b"\x00\x01a\x00OCTET\x00tsize\x000\x00blksize\x001468\x00\x00",
            Ok(Packet::ReadRequest {
                filename: "a",
                mode: TransferMode::Octet,
                options: vec![
                    TftpOption {
                        name: "tsize",
                        value: "0",
                    },
                    TftpOption {
                        name: "blksize",
                        value: "1468",
                    },
                ],
            }),
        ),
        (
            b"\x00\x02up\x00netascii\x00",
            Ok(Packet::WriteRequest {
                filename: "up",
                mode: TransferMode::Netascii,
                options: Vec::new(),
            }),
        ),
        (
            b"\x00\x03\xff\xffxyz",
            Ok(Packet::Data {
                block: 65535,
                data: b"xyz",
            }),
        ),
        (
            b"\x00\x03\x00\x00",
            Ok(Packet::Data {
                block: 0,
                data: b"",
            }),
        ),
        (b"\x00\x04\x01\x02", Ok(Packet::Ack { block: 258 })),
        (
            b"\x00\x05\x00\x01nope\x00",
            Ok(Packet::Error {
                code: 1,
                message: "nope",
            }),
        ),
        (
            b"\x00\x06blksize\x00512\x00",
            Ok(Packet::OptionAck {
                options: vec![TftpOption {
                    name: "blksize",
                    value: "512",
                }],
            }),
        ),
        (b"", Err(PacketError::TooShort { length_bytes: 0 })),
        (b"\x00", Err(PacketError::TooShort { length_bytes: 1 })),
        (b"\x00\x07", Err(PacketError::UnknownOpcode(7))),
        (b"\x00\x00", Err(PacketError::UnknownOpcode(0))),
        (
            b"\x00\x03\x00",
            Err(PacketError::TooShort { length_bytes: 3 }),
        ),
        (
            b"\x00\x04\x00",
            Err(PacketError::TooShort { length_bytes: 3 }),
        ),
        (
            b"\x00\x04\x00\x01\x00",
            Err(PacketError::TooLong {
                length_bytes: 5,
                limit_bytes: 4,
            }),
        ),
        (
            b"\x00\x05\x00",
            Err(PacketError::TooShort { length_bytes: 3 }),
        ),
        (
            b"\x00\x05\x00\x00text",
            Err(PacketError::MissingTerminator {
                field: "error message",
            }),
        ),
        (
            b"\x00\x05\x00\x00text\x00more",
            Err(PacketError::TrailingBytes { count: 4 }),
        ),
        (
            b"\x00\x01name",
            Err(PacketError::MissingTerminator { field: "filename" }),
        ),
        (
            b"\x00\x01name\x00octet",
            Err(PacketError::MissingTerminator { field: "mode" }),
        ),
        (
            b"\x00\x01n\xc3\x28\x00octet\x00",
            Err(PacketError::NotUtf8 { field: "filename" }),
        ),
        (
            b"\x00\x01n\x00octet\x00\xff\x00v\x00",
            Err(PacketError::NotUtf8 {
                field: "option name",
            }),
        ),
        (
            b"\x00\x01n\x00octets\x00",
            Err(PacketError::UnknownTransferMode),
        ),
        (
            b"\x00\x01n\x00octet\x00tsize\x00",
            Err(PacketError::OptionWithoutValue),
        ),
        (
            b"\x00\x01n\x00octet\x00tsize\x000",
            Err(PacketError::MissingTerminator {
                field: "option value",
            }),
        ),
        (
            b"\x00\x01n\x00octet\x00\x00v\x00",
            Err(PacketError::EmptyOptionName),
        ),
        (
            b"\x00\x01n\x00octet\x00tsize\x000\x00TSIZE\x000\x00",
            Err(PacketError::DuplicateOption),
        ),
        (b"\x00\x06blksize\x00", Err(PacketError::OptionWithoutValue)),
    ];
    for (datagram, expected) in cases {
        assert_eq!(Packet::decode(datagram), expected, "datagram {datagram:?}");
    }
}

#[test]
fn oversized_and_overlong_packets_are_refused() {
    let mut request = b"\x00\x01".to_vec();
    request.extend(std::iter::repeat_n(b'a', STRING_PACKET_BYTES_MAX));
    assert_eq!(
        Packet::decode(&request),
        Err(PacketError::TooLong {
            length_bytes: STRING_PACKET_BYTES_MAX + 2,
            limit_bytes: STRING_PACKET_BYTES_MAX,
        })
    );
    let mut data = b"\x00\x03\x00\x01".to_vec();
    data.resize(DATA_PACKET_BYTES_MAX, 1);
    assert!(Packet::decode(&data).is_ok());
    data.push(1);
    assert!(matches!(
        Packet::decode(&data),
        Err(PacketError::TooLong { .. })
    ));
    let mut many_options = b"\x00\x01f\x00octet\x00".to_vec();
    for index in 0..=OPTIONS_COUNT_MAX {
        many_options.extend_from_slice(format!("o{index}\x001\x00").as_bytes());
    }
    assert_eq!(
        Packet::decode(&many_options),
        Err(PacketError::TooManyOptions {
            limit: OPTIONS_COUNT_MAX
        })
    );
}

/// Decodes, re-encodes and decodes again, as the fuzz target does, over valid packets and
/// deterministic pseudo-random mutations of them; nothing may panic and every decodable
/// datagram must round-trip.
#[test]
fn decode_never_panics_and_decoded_packets_round_trip() {
    let seeds: [&[u8]; 6] = [
        b"\x00\x01boot/pxelinux.0\x00octet\x00blksize\x001468\x00tsize\x000\x00windowsize\x004\x00",
        b"\x00\x02file\x00NETASCII\x00",
        b"\x00\x03\x00\x01hello",
        b"\x00\x04\xff\xff",
        b"\x00\x05\x00\x01file not found\x00",
        b"\x00\x06blksize\x001468\x00tsize\x0012345\x00",
    ];
    let mut random_state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_random = move || {
        // xorshift64: deterministic, so a failure reproduces.
        random_state ^= random_state << 13;
        random_state ^= random_state >> 7;
        random_state ^= random_state << 17;
        random_state
    };
    let mut decoded_count = 0;
    for _iteration in 0..20_000 {
        let seed = seeds[(next_random() % seeds.len() as u64) as usize];
        let mut datagram = seed.to_vec();
        for _mutation in 0..(next_random() % 4) {
            let position = (next_random() % (datagram.len() as u64 + 1)) as usize;
            match next_random() % 4 {
                0 => datagram.truncate(position),
                1 => datagram.insert(position, next_random() as u8),
                2 if position < datagram.len() => datagram[position] = next_random() as u8,
                _ if position < datagram.len() => {
                    datagram.remove(position);
                }
                _ => {}
            }
        }
        if let Ok(packet) = Packet::decode(&datagram) {
            decoded_count += 1;
            let encoded = encode(&packet);
            assert_eq!(
                Packet::decode(&encoded),
                Ok(packet),
                "datagram {datagram:?}"
            );
        }
    }
    assert!(decoded_count > 1000, "mutations should often stay valid");
}
