//! Raft's messages over any ordered byte stream: QUIC streams between servers, simulated TCP in
//! the simulator. A frame is a 4-byte big-endian length and a JSON body; each connection
//! carries one request at a time, answered in order.
//!
//! A peer that sends an oversized or undecodable frame loses its connection, which is logged;
//! nothing else is affected. A sender whose connection fails drops it and dials again on the
//! next call; openraft backs off from a peer it cannot reach.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::time::Duration;

use openraft::RPCTypes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{MeshRaft, MeshTypeConfig, ServerNode};

/// Largest frame accepted: snapshot chunks (3 MiB by default) and batches of entries fit with
/// room to spare; anything larger is a broken or hostile peer.
pub const FRAME_BYTES_MAX: usize = 64 << 20;

/// A request from a leader or candidate.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    /// Replicate entries or heartbeat.
    AppendEntries(AppendEntriesRequest<MeshTypeConfig>),
    /// Ask for a vote.
    Vote(VoteRequest<u64>),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<MeshTypeConfig>),
}

/// The answer to a [`RaftRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// To `AppendEntries`.
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// To `InstallSnapshot`.
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or closed.
    #[error("stream: {0}")]
    Io(#[from] io::Error),
    /// The length prefix exceeds [`FRAME_BYTES_MAX`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The body is not a message of the expected kind.
    #[error("undecodable frame: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Writes one frame.
pub async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    message: &impl Serialize,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(message)?;
    if body.len() > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(body.len()));
    }
    let length = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len()))?;
    stream.write_all(&length.to_be_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the peer closed the stream between frames.
pub async fn read_frame<S: AsyncRead + Unpin, T: DeserializeOwned>(
    stream: &mut S,
) -> Result<Option<T>, FrameError> {
    let mut length = [0u8; 4];
    match stream.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let length = u32::from_be_bytes(length) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(length));
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    decode_body(&body).map(Some)
}

/// Decodes a frame's body (after its length prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(body.len()));
    }
    Ok(serde_json::from_slice(body)?)
}

/// Answers Raft requests arriving on `stream` until the peer closes it or breaks the protocol.
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(raft: MeshRaft, mut stream: S) {
    loop {
        let request = match read_frame::<_, RaftRequest>(&mut stream).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            // The peer went away (it stopped, restarted, or the network did): routine.
            Err(FrameError::Io(error)) => {
                tracing::info!(%error, "raft connection closed");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "raft connection dropped: bad frame");
                return;
            }
        };
        let reply = match request {
            RaftRequest::AppendEntries(request) => {
                RaftReply::AppendEntries(raft.append_entries(request).await)
            }
            RaftRequest::Vote(request) => RaftReply::Vote(raft.vote(request).await),
            RaftRequest::InstallSnapshot(request) => {
                RaftReply::InstallSnapshot(raft.install_snapshot(request).await)
            }
        };
        if let Err(error) = write_frame(&mut stream, &reply).await {
            tracing::debug!(%error, "raft connection closed while replying");
            return;
        }
    }
}

/// Opens byte streams to peers: a QUIC connection's stream in production, a simulated TCP
/// connection in the simulator.
pub trait Dialer: Clone + Send + Sync + 'static {
    /// The stream type.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static;

    /// Connects to the peer listening at `address`.
    fn dial(&self, address: &str) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// Makes a [`StreamNetwork`] per peer.
#[derive(Debug, Clone)]
pub struct StreamNetworkFactory<D> {
    own_id: u64,
    dialer: D,
}

impl<D: Dialer> StreamNetworkFactory<D> {
    /// Factory for server `own_id`.
    pub fn new(own_id: u64, dialer: D) -> Self {
        Self { own_id, dialer }
    }
}

impl<D: Dialer> RaftNetworkFactory<MeshTypeConfig> for StreamNetworkFactory<D> {
    type Network = StreamNetwork<D>;

    async fn new_client(&mut self, target: u64, node: &ServerNode) -> Self::Network {
        StreamNetwork {
            own_id: self.own_id,
            target,
            address: node.address.clone(),
            dialer: self.dialer.clone(),
            connection: None,
        }
    }
}

/// One peer's connection, opened on first use and again after a failure.
#[derive(Debug)]
pub struct StreamNetwork<D: Dialer> {
    own_id: u64,
    target: u64,
    address: String,
    dialer: D,
    connection: Option<D::Stream>,
}

enum CallError {
    Unreachable(io::Error),
    Broken(FrameError),
    Timeout(Duration),
}

impl<D: Dialer> StreamNetwork<D> {
    async fn call(
        &mut self,
        request: &RaftRequest,
        limit: Duration,
    ) -> Result<RaftReply, CallError> {
        let exchange = async {
            let stream = match &mut self.connection {
                Some(stream) => stream,
                None => {
                    let stream = self
                        .dialer
                        .dial(&self.address)
                        .await
                        .map_err(CallError::Unreachable)?;
                    self.connection.insert(stream)
                }
            };
            write_frame(stream, request)
                .await
                .map_err(CallError::Broken)?;
            match read_frame::<_, RaftReply>(stream).await {
                Ok(Some(reply)) => Ok(reply),
                Ok(None) => Err(CallError::Broken(FrameError::Io(
                    io::ErrorKind::UnexpectedEof.into(),
                ))),
                Err(error) => Err(CallError::Broken(error)),
            }
        };
        let result = match tokio::time::timeout(limit, exchange).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout(limit)),
        };
        if result.is_err() {
            // A half-used stream may hold a late reply to this request: never reuse it.
            self.connection = None;
        }
        result
    }

    fn error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        error: CallError,
    ) -> RPCError<u64, ServerNode, E> {
        match error {
            CallError::Unreachable(error) => RPCError::Unreachable(Unreachable::new(&error)),
            CallError::Broken(error) => RPCError::Network(NetworkError::new(&error)),
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: self.own_id,
                target: self.target,
                timeout,
            }),
        }
    }

    fn unexpected<E: std::error::Error>(&self, reply: &RaftReply) -> RPCError<u64, ServerNode, E> {
        let error = io::Error::other(format!("reply of the wrong kind: {reply:?}"));
        RPCError::Network(NetworkError::new(&error))
    }
}

impl<D: Dialer> RaftNetwork<MeshTypeConfig> for StreamNetwork<D> {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<MeshTypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, ServerNode, RaftError<u64>>> {
        let request = RaftRequest::AppendEntries(request);
        match self.call(&request, option.hard_ttl()).await {
            Ok(RaftReply::AppendEntries(Ok(response))) => Ok(response),
            Ok(RaftReply::AppendEntries(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(other) => Err(self.unexpected(&other)),
            Err(error) => Err(self.error(RPCTypes::AppendEntries, error)),
        }
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<MeshTypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, ServerNode, RaftError<u64, InstallSnapshotError>>,
    > {
        let request = RaftRequest::InstallSnapshot(request);
        match self.call(&request, option.hard_ttl()).await {
            Ok(RaftReply::InstallSnapshot(Ok(response))) => Ok(response),
            Ok(RaftReply::InstallSnapshot(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(other) => Err(self.unexpected(&other)),
            Err(error) => Err(self.error(RPCTypes::InstallSnapshot, error)),
        }
    }

    async fn vote(
        &mut self,
        request: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, ServerNode, RaftError<u64>>> {
        let request = RaftRequest::Vote(request);
        match self.call(&request, option.hard_ttl()).await {
            Ok(RaftReply::Vote(Ok(response))) => Ok(response),
            Ok(RaftReply::Vote(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(other) => Err(self.unexpected(&other)),
            Err(error) => Err(self.error(RPCTypes::Vote, error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_or_garbled_frames_are_refused() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let request = RaftRequest::Vote(VoteRequest::new(openraft::Vote::new(3, 1), None));
        write_frame(&mut client, &request).await.unwrap_or_default();
        let received: Option<RaftRequest> = read_frame(&mut server).await.unwrap_or(None);
        assert!(
            matches!(received, Some(RaftRequest::Vote(vote)) if vote.vote.leader_id().term == 3)
        );

        client
            .write_all(&((FRAME_BYTES_MAX as u32) + 1).to_be_bytes())
            .await
            .unwrap_or_default();
        let oversized = read_frame::<_, RaftRequest>(&mut server).await;
        assert!(matches!(oversized, Err(FrameError::TooLarge(_))));

        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client
            .write_all(&3u32.to_be_bytes())
            .await
            .unwrap_or_default();
        client.write_all(b"{x}").await.unwrap_or_default();
        let garbled = read_frame::<_, RaftRequest>(&mut server).await;
        assert!(matches!(garbled, Err(FrameError::Decode(_))));
        drop(client);
        let closed = read_frame::<_, RaftRequest>(&mut server).await;
        assert!(matches!(closed, Ok(None)));
    }
}
