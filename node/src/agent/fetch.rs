//! Fetching from boot servers over HTTP: the node plan, the manifest and chunks (the
//! `ChunkTransport` seam's HTTP side), with every chunk verified before it is kept and every
//! failure answered by asking the next server.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::seams::monotonic_now;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use transfer::{ChunkRef, ChunkTransport, ContentHash, Manifest, Part, verify_chunk};

/// Why one request to one server failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpFetchError {
    /// No answer in time.
    #[error("{url}: no answer within {timeout:?}")]
    Timeout {
        /// What was asked.
        url: String,
        /// The bound.
        timeout: Duration,
    },
    /// Connection or protocol failure.
    #[error("{url}: {reason}")]
    Request {
        /// What was asked.
        url: String,
        /// The cause.
        reason: String,
    },
    /// An answer other than 200.
    #[error("{url}: HTTP {status}")]
    Status {
        /// What was asked.
        url: String,
        /// The status code.
        status: u16,
    },
}

/// Why a whole fetch failed, after every server was tried.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No server gave a usable answer.
    #[error("{what}: every server failed; last: {last}")]
    AllServersFailed {
        /// What was fetched.
        what: String,
        /// The last failure.
        last: String,
    },
    /// The memfd could not be written.
    #[error("writing the root image to memory: {0}")]
    Write(std::io::Error),
}

/// Bytes a manifest may have; a bigger answer is not a manifest.
const MANIFEST_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Bytes a chunk may have (FastCDC's maximum is 1 MiB).
const CHUNK_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Bytes of a JSON plan or secrets answer.
const JSON_BYTES_MAX: usize = 1024 * 1024;
/// Requests in flight while filling the root image: enough to hide a LAN round trip, few
/// enough that a thousand booting nodes do not each open dozens of connections.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Boot servers reached over plain HTTP by IP literal.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    servers: Vec<SocketAddr>,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl HttpTransport {
    /// A transport to `servers`, in preference order.
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(CHUNKS_IN_FLIGHT)
            .build(connector);
        Self {
            servers,
            client,
            timeout: Duration::from_secs(20),
        }
    }

    /// The servers.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// GETs `path` from server `source`; the body may have `bytes_max` bytes.
    pub async fn get(
        &self,
        source: usize,
        path: &str,
        bytes_max: usize,
    ) -> Result<Vec<u8>, HttpFetchError> {
        let server = self.servers.get(source).copied();
        let url = match server {
            Some(server) => format!("http://{server}/{}", path.trim_start_matches('/')),
            None => format!("(no server {source})/{path}"),
        };
        let request_error = |reason: String| HttpFetchError::Request {
            url: redact(&url),
            reason,
        };
        let uri: hyper::Uri = url
            .parse()
            .map_err(|error| request_error(format!("{error}")))?;
        let exchange = async {
            let response = self
                .client
                .get(uri)
                .await
                .map_err(|error| request_error(format!("{error}")))?;
            let status = response.status();
            if status != hyper::StatusCode::OK {
                return Err(HttpFetchError::Status {
                    url: redact(&url),
                    status: status.as_u16(),
                });
            }
            let body = Limited::new(response.into_body(), bytes_max)
                .collect()
                .await
                .map_err(|error| request_error(format!("body: {error}")))?;
            Ok(body.to_bytes().to_vec())
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpFetchError::Timeout {
                url: redact(&url),
                timeout: self.timeout,
            }),
        }
    }

    /// POSTs `body` (JSON) to `path` on server `source`, within `timeout`; any 2xx answer is
    /// success.
    pub async fn post_json(
        &self,
        source: usize,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), HttpFetchError> {
        let url = match self.servers.get(source) {
            Some(server) => format!("http://{server}/{}", path.trim_start_matches('/')),
            None => format!("(no server {source})/{path}"),
        };
        let request_error = |reason: String| HttpFetchError::Request {
            url: url.clone(),
            reason,
        };
        let request = hyper::Request::post(url.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|error| request_error(format!("{error}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| request_error(format!("{error}")))?;
            if !response.status().is_success() {
                return Err(HttpFetchError::Status {
                    url: url.clone(),
                    status: response.status().as_u16(),
                });
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpFetchError::Timeout {
                url: url.clone(),
                timeout,
            }),
        }
    }

    /// GETs JSON at `path`, trying every server from `first`; returns the answer and the
    /// server that gave it.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
    ) -> Result<(T, usize), FetchError> {
        let mut last = String::from("no servers");
        for source in 0..self.servers.len() {
            match self.get(source, path, JSON_BYTES_MAX).await {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(value) => return Ok((value, source)),
                    Err(error) => {
                        last = format!(
                            "{}: {what} does not parse: {error}",
                            self.source_name(source)
                        );
                    }
                },
                Err(error) => last = error.to_string(),
            }
            tracing::warn!(server = %self.source_name(source), %last, "{what}: trying the next server");
        }
        Err(FetchError::AllServersFailed {
            what: what.to_owned(),
            last,
        })
    }
}

/// URLs may carry a token in their query; logs and errors never show it.
fn redact(url: &str) -> String {
    match url.split_once('?') {
        Some((path, _)) => format!("{path}?<redacted>"),
        None => url.to_owned(),
    }
}

impl ChunkTransport for HttpTransport {
    type Error = HttpFetchError;

    fn source_count(&self) -> usize {
        self.servers.len()
    }

    fn source_name(&self, source: usize) -> String {
        self.servers
            .get(source)
            .map(|server| server.to_string())
            .unwrap_or_else(|| format!("server #{source}"))
    }

    async fn fetch_manifest(
        &self,
        source: usize,
        hash: &ContentHash,
    ) -> Result<Vec<u8>, Self::Error> {
        self.get(source, &format!("manifests/{hash}"), MANIFEST_BYTES_MAX)
            .await
    }

    async fn fetch_chunk(&self, source: usize, hash: &ContentHash) -> Result<Vec<u8>, Self::Error> {
        self.get(source, &format!("chunks/{hash}"), CHUNK_BYTES_MAX)
            .await
    }
}

/// Fetches manifest `hash` from the first source that has it and whose bytes hash to `hash`.
pub async fn fetch_manifest<T: ChunkTransport>(
    transport: &T,
    hash: &ContentHash,
) -> Result<Manifest, FetchError> {
    let mut last = String::from("no servers");
    for source in 0..transport.source_count() {
        match transport.fetch_manifest(source, hash).await {
            Ok(bytes) => match Manifest::decode_expecting(&bytes, *hash) {
                Ok(manifest) => return Ok(manifest),
                Err(error) => {
                    // A server that serves a wrong manifest is worth an operator's attention.
                    tracing::error!(
                        server = %transport.source_name(source),
                        image = %hash,
                        %error,
                        "REJECTED manifest: not the image on the command line"
                    );
                    last = error.to_string();
                }
            },
            Err(error) => {
                tracing::warn!(server = %transport.source_name(source), %error, "manifest: trying the next server");
                last = error.to_string();
            }
        }
    }
    Err(FetchError::AllServersFailed {
        what: format!("manifest {hash}"),
        last,
    })
}

/// What a fetch of a part did: for the console summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchSummary {
    /// Chunks stored.
    pub chunks: usize,
    /// Bytes stored.
    pub bytes: u64,
    /// Chunks refused because their bytes were not what the manifest says.
    pub chunks_rejected: usize,
    /// Requests that failed (timeouts, errors) and were retried elsewhere.
    pub requests_failed: usize,
}

/// One chunk, from whichever source gives the right bytes first.
/// How long a source that did not answer is skipped: a dead server then costs one timeout per
/// fetch, not one per chunk.
const SOURCE_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceState {
    Good,
    DownUntil(Instant),
    /// Served bytes that are not what the manifest says: not asked again during this fetch.
    Banned,
}

/// What this fetch learned about its sources.
#[derive(Debug)]
struct SourceHealth {
    states: std::sync::Mutex<Vec<SourceState>>,
}

impl SourceHealth {
    fn new(sources: usize) -> Self {
        Self {
            states: std::sync::Mutex::new(vec![SourceState::Good; sources]),
        }
    }

    /// The sources to try, in rotation from `first`: usable ones first, then (if a chunk must
    /// still be found) ones that were down; never banned ones.
    fn order(&self, first: usize) -> Vec<usize> {
        let Ok(states) = self.states.lock() else {
            return Vec::new();
        };
        let now = monotonic_now();
        let count = states.len();
        let rotation = (0..count).map(|offset| (first + offset) % count);
        let mut usable: Vec<usize> = rotation
            .clone()
            .filter(|source| match states[*source] {
                SourceState::Good => true,
                SourceState::DownUntil(until) => now >= until,
                SourceState::Banned => false,
            })
            .collect();
        usable.extend(rotation.filter(
            |source| matches!(states[*source], SourceState::DownUntil(until) if now < until),
        ));
        usable
    }

    fn mark_down(&self, source: usize) {
        if let Ok(mut states) = self.states.lock()
            && let Some(state) = states.get_mut(source)
            && *state != SourceState::Banned
        {
            *state = SourceState::DownUntil(monotonic_now() + SOURCE_BACKOFF);
        }
    }

    fn mark_good(&self, source: usize) {
        if let Ok(mut states) = self.states.lock()
            && let Some(state) = states.get_mut(source)
            && matches!(*state, SourceState::DownUntil(_))
        {
            *state = SourceState::Good;
        }
    }

    fn ban(&self, source: usize) {
        if let Ok(mut states) = self.states.lock()
            && let Some(state) = states.get_mut(source)
        {
            *state = SourceState::Banned;
        }
    }
}

/// Whether chunks are checked against the manifest: always, but for the simulator's
/// sabotage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verification {
    Always,
    #[cfg_attr(not(feature = "sabotage"), allow(dead_code))]
    Never,
}

/// One chunk, from whichever source gives the right bytes first.
async fn fetch_chunk_verified<T: ChunkTransport>(
    transport: &T,
    chunk: &ChunkRef,
    first_source: usize,
    health: &SourceHealth,
    summary: &std::sync::Mutex<FetchSummary>,
    verification: Verification,
) -> Result<Vec<u8>, FetchError> {
    let mut last = String::from("no servers");
    // Two passes: a transient failure (a restart) gets a second chance before the boot round
    // is abandoned.
    for _ in 0..2 {
        for source in health.order(first_source) {
            match transport.fetch_chunk(source, &chunk.hash).await {
                Ok(bytes) if verification == Verification::Never => return Ok(bytes),
                Ok(bytes) => match verify_chunk(chunk, &bytes) {
                    Ok(()) => {
                        health.mark_good(source);
                        return Ok(bytes);
                    }
                    Err(error) => {
                        tracing::error!(
                            server = %transport.source_name(source),
                            chunk = %chunk.hash,
                            %error,
                            "REJECTED chunk: bytes do not match the manifest; that server is \
                             not asked again during this boot"
                        );
                        health.ban(source);
                        if let Ok(mut summary) = summary.lock() {
                            summary.chunks_rejected += 1;
                        }
                        last = error.to_string();
                    }
                },
                Err(error) => {
                    tracing::warn!(server = %transport.source_name(source), %error, "chunk: trying the next server");
                    health.mark_down(source);
                    if let Ok(mut summary) = summary.lock() {
                        summary.requests_failed += 1;
                    }
                    last = error.to_string();
                }
            }
        }
    }
    Err(FetchError::AllServersFailed {
        what: format!("chunk {}", chunk.hash),
        last,
    })
}

/// Where verified chunks go: the root image in RAM (a memfd), or the simulator's check.
pub trait ChunkSink {
    /// Writes a chunk's bytes at `offset`.
    fn write_chunk(&self, bytes: &[u8], offset: u64) -> std::io::Result<()>;
}

impl ChunkSink for File {
    fn write_chunk(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        self.write_all_at(bytes, offset)
    }
}

/// Fetches every chunk of `part` into `sink` at its offset, verified; nothing unverified is
/// ever written. Chunks are spread over the sources so that no single server carries a boot.
pub async fn fetch_part_into<T: ChunkTransport + Sync, S: ChunkSink>(
    transport: &T,
    part: &Part,
    sink: &S,
    progress: impl FnMut(&FetchSummary),
) -> Result<FetchSummary, FetchError> {
    fetch_part(transport, part, sink, progress, Verification::Always).await
}

/// [`fetch_part_into`] without checking the chunks: the simulator's sabotage, to show its
/// checker catches a node that keeps bytes the manifest does not vouch for.
#[cfg(feature = "sabotage")]
pub async fn fetch_part_unverified<T: ChunkTransport + Sync, S: ChunkSink>(
    transport: &T,
    part: &Part,
    sink: &S,
    progress: impl FnMut(&FetchSummary),
) -> Result<FetchSummary, FetchError> {
    fetch_part(transport, part, sink, progress, Verification::Never).await
}

async fn fetch_part<T: ChunkTransport + Sync, S: ChunkSink>(
    transport: &T,
    part: &Part,
    sink: &S,
    mut progress: impl FnMut(&FetchSummary),
    verification: Verification,
) -> Result<FetchSummary, FetchError> {
    let summary = std::sync::Mutex::new(FetchSummary::default());
    let sources = transport.source_count().max(1);
    let health = SourceHealth::new(sources);
    let health_ref = &health;
    let mut offset = 0u64;
    let mut placed = Vec::with_capacity(part.chunks.len());
    for (index, chunk) in part.chunks.iter().enumerate() {
        placed.push((index, *chunk, offset));
        offset += u64::from(chunk.length_bytes);
    }
    let summary_ref = &summary;
    let mut fetches = futures_util::stream::iter(placed)
        .map(|(index, chunk, offset)| async move {
            let bytes = fetch_chunk_verified(
                transport,
                &chunk,
                index % sources,
                health_ref,
                summary_ref,
                verification,
            )
            .await?;
            Ok::<_, FetchError>((bytes, offset))
        })
        .buffer_unordered(CHUNKS_IN_FLIGHT);
    while let Some(result) = fetches.next().await {
        let (bytes, offset) = result?;
        sink.write_chunk(&bytes, offset)
            .map_err(FetchError::Write)?;
        let snapshot = {
            let mut summary = summary
                .lock()
                .map_err(|_| FetchError::Write(std::io::Error::other("summary lock poisoned")))?;
            summary.chunks += 1;
            summary.bytes += bytes.len() as u64;
            *summary
        };
        progress(&snapshot);
    }
    let snapshot = summary.lock().map(|summary| *summary).unwrap_or_default();
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_sources_go_last_and_banned_ones_never_come_back() {
        let health = SourceHealth::new(3);
        assert_eq!(health.order(1), vec![1, 2, 0]);
        health.mark_down(2);
        assert_eq!(health.order(1), vec![1, 0, 2]);
        health.ban(0);
        assert_eq!(health.order(0), vec![1, 2]);
        health.mark_good(2);
        assert_eq!(health.order(2), vec![2, 1]);
        health.mark_good(0);
        assert_eq!(health.order(0), vec![1, 2], "a ban lasts the whole fetch");
    }

    #[test]
    fn tokens_in_urls_are_redacted() {
        assert_eq!(
            redact("http://10.0.0.1:8080/nodes/x/secrets?token=abcd"),
            "http://10.0.0.1:8080/nodes/x/secrets?<redacted>"
        );
        assert_eq!(redact("http://a/b"), "http://a/b");
    }
}
