//! Simulated booting nodes: a DHCP client and a TFTP client written from the RFCs, driven by
//! turmoil. They are deliberately independent of the server code they exercise (they build
//! packets with dhcproto and by hand), so a bug shared by both sides cannot hide.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Encodable};

use crate::trace::Trace;

/// How long a node waits for a reply before it retransmits.
const RETRANSMIT_AFTER: Duration = Duration::from_secs(2);
/// Retransmissions before a node gives up.
const ATTEMPTS_MAX: usize = 8;

type ClientResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A small xorshift RNG: the node's own seeded randomness (xids).
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn message(message_type: MessageType, xid: u32, mac: [u8; 6]) -> Message {
    let mut message = Message::default();
    message.set_xid(xid);
    message.set_chaddr(&mac);
    message
        .opts_mut()
        .insert(DhcpOption::MessageType(message_type));
    message
}

async fn exchange(
    socket: &turmoil::net::UdpSocket,
    server: IpAddr,
    request: &Message,
    expected: &[MessageType],
    mac: [u8; 6],
    trace: &Trace,
) -> ClientResult<Message> {
    let bytes = request.to_vec()?;
    let mut buffer = vec![0u8; 1500];
    for _ in 0..ATTEMPTS_MAX {
        trace.record(format!(
            "{} -> server: {:?} xid={:#x}",
            format_mac(mac),
            request.opts().msg_type(),
            request.xid()
        ));
        socket.send_to(&bytes, SocketAddr::new(server, 67)).await?;
        let deadline = tokio::time::sleep(RETRANSMIT_AFTER);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                () = &mut deadline => break,
                received = socket.recv_from(&mut buffer) => {
                    let (length, _) = received?;
                    let Ok(reply) = Message::from_bytes(buffer.get(..length).unwrap_or_default()) else { continue };
                    // Replies for other nodes reach us too (the simulated broadcast).
                    if reply.xid() != request.xid() || reply.chaddr() != mac {
                        continue;
                    }
                    match reply.opts().msg_type() {
                        Some(kind) if expected.contains(&kind) => return Ok(reply),
                        _ => continue,
                    }
                }
            }
        }
    }
    Err(format!("no {expected:?} after {ATTEMPTS_MAX} attempts").into())
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// DISCOVER, OFFER, REQUEST, ACK. Returns the acknowledged address.
pub async fn obtain_lease(
    server: IpAddr,
    mac: [u8; 6],
    seed: u64,
    trace: &Trace,
) -> ClientResult<Ipv4Addr> {
    let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 68)).await?;
    let mut rng = seed | 1;
    let xid = next_random(&mut rng) as u32;
    let discover = message(MessageType::Discover, xid, mac);
    let offer = exchange(
        &socket,
        server,
        &discover,
        &[MessageType::Offer],
        mac,
        trace,
    )
    .await?;
    let Some(DhcpOption::ServerIdentifier(server_identifier)) =
        offer.opts().get(OptionCode::ServerIdentifier).cloned()
    else {
        return Err("offer without server identifier".into());
    };
    let mut request = message(MessageType::Request, xid, mac);
    request
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
    request
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(server_identifier));
    let ack = exchange(
        &socket,
        server,
        &request,
        &[MessageType::Ack, MessageType::Nak],
        mac,
        trace,
    )
    .await?;
    if ack.opts().msg_type() != Some(MessageType::Ack) {
        return Err("request was refused (NAK)".into());
    }
    if ack.yiaddr() != offer.yiaddr() {
        return Err(format!("ack for {} after offer of {}", ack.yiaddr(), offer.yiaddr()).into());
    }
    trace.record(format!("{} bound {}", format_mac(mac), ack.yiaddr()));
    Ok(ack.yiaddr())
}

/// Downloads `path` by TFTP with `blksize` and tsize (RFC 2347/2348/2349), one ACK per block.
pub async fn tftp_download(
    server: IpAddr,
    path: &str,
    blksize: u16,
    trace: &Trace,
) -> ClientResult<Vec<u8>> {
    let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    let mut request = vec![0, 1];
    for part in [path, "octet", "blksize", &blksize.to_string(), "tsize", "0"] {
        request.extend_from_slice(part.as_bytes());
        request.push(0);
    }
    let mut buffer = vec![0u8; usize::from(blksize) + 4];
    let mut file = Vec::new();
    let mut expected_block: u16 = 0;
    let mut session: Option<SocketAddr> = None;
    let mut last_sent = request.clone();
    let mut destination = SocketAddr::new(server, 69);
    let mut declared_size: Option<usize> = None;
    let mut attempts = 0;
    loop {
        socket.send_to(&last_sent, destination).await?;
        let received = tokio::time::timeout(RETRANSMIT_AFTER, socket.recv_from(&mut buffer)).await;
        let Ok(received) = received else {
            attempts += 1;
            if attempts >= ATTEMPTS_MAX {
                return Err("tftp server stopped answering".into());
            }
            continue;
        };
        let (length, from) = received?;
        attempts = 0;
        if session.is_some_and(|session| session != from) {
            continue;
        }
        let packet = buffer.get(..length).unwrap_or_default();
        let opcode = packet
            .get(..2)
            .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]));
        match opcode {
            Some(6) if session.is_none() => {
                // OACK: read tsize, acknowledge block 0.
                let fields: Vec<&[u8]> = packet
                    .get(2..)
                    .unwrap_or_default()
                    .split(|byte| *byte == 0)
                    .collect();
                for pair in fields.chunks(2) {
                    if let [name, value] = pair
                        && name.eq_ignore_ascii_case(b"tsize")
                    {
                        declared_size = std::str::from_utf8(value)
                            .ok()
                            .and_then(|value| value.parse().ok());
                    }
                }
                session = Some(from);
                destination = from;
                last_sent = vec![0, 4, 0, 0];
                trace.record(format!("tftp {path}: oack, tsize {declared_size:?}"));
            }
            Some(3) => {
                let block = packet
                    .get(2..4)
                    .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
                    .unwrap_or(0);
                session = Some(from);
                destination = from;
                if block == expected_block.wrapping_add(1) {
                    expected_block = block;
                    let data = packet.get(4..).unwrap_or_default();
                    file.extend_from_slice(data);
                    last_sent = vec![0, 4, (block >> 8) as u8, block as u8];
                    if data.len() < usize::from(blksize) {
                        socket.send_to(&last_sent, destination).await?;
                        trace.record(format!(
                            "tftp {path}: {} bytes in {block} blocks",
                            file.len()
                        ));
                        if declared_size.is_some_and(|size| size != file.len()) {
                            return Err("tsize differs from the bytes received".into());
                        }
                        return Ok(file);
                    }
                }
            }
            Some(5) => {
                return Err(format!(
                    "tftp error: {}",
                    String::from_utf8_lossy(packet.get(4..).unwrap_or_default())
                )
                .into());
            }
            _ => {}
        }
    }
}
