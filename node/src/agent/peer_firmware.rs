//! Firmware-stage files from booted peers (ADR 0016): a booted node of a group with
//! `firmware_from_peers` serves its image's kernel and initrd over HTTP, at the servers' paths
//! (`/images/<manifest>/kernel`, `/images/<manifest>/initrd`) on
//! [`crate::plan::PEER_FIRMWARE_PORT`], so that boot scripts can name it before a server.
//!
//! Every chunk is read back through the shelf, which verifies it against its hash, before a
//! byte of it is sent: a node whose memory changed under it refuses rather than serves. Nothing
//! else is served; requests are bounded in number and time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use transfer::{ContentHash, Manifest, Part};

use crate::swarm::ChunkShelf;

/// Files served at once: each is read whole into memory (a kernel, an initrd), so this bounds
/// what booting nodes can make a booted node hold.
const REQUESTS_IN_FLIGHT_MAX: usize = 4;
/// A request that takes longer is cut: a booting node on a healthy link needs a second.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What a booted node serves to booting ones.
#[derive(Clone)]
pub struct PeerFirmware {
    manifest: ContentHash,
    kernel: Option<Part>,
    initrd: Option<Part>,
    shelf: Arc<dyn ChunkShelf>,
}

impl std::fmt::Debug for PeerFirmware {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PeerFirmware")
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}

impl PeerFirmware {
    /// The kernel and initrd of `manifest` (named `hash`), read from `shelf`.
    pub fn new(hash: ContentHash, manifest: &Manifest, shelf: Arc<dyn ChunkShelf>) -> Self {
        Self {
            manifest: hash,
            kernel: manifest.kernel.clone(),
            initrd: manifest.initrd.clone(),
            shelf,
        }
    }

    /// The part a request path names, if it is one this node serves.
    fn part_for(&self, path: &str) -> Option<&Part> {
        let rest = path.strip_prefix("/images/")?;
        let (hash, name) = rest.split_once('/')?;
        if hash != self.manifest.to_hex() {
            return None;
        }
        match name {
            "kernel" => self.kernel.as_ref(),
            "initrd" => self.initrd.as_ref(),
            _ => None,
        }
    }
}

/// Serves `firmware` on `0.0.0.0:port` until the process ends; a bind failure is logged.
pub async fn serve(firmware: PeerFirmware, port: u16) {
    let address = SocketAddr::from(([0, 0, 0, 0], port));
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%address, %error, "not serving firmware-stage files to peers");
            return;
        }
    };
    tracing::info!(%address, image = %firmware.manifest, "serving the kernel and initrd to booting peers");
    let firmware = Arc::new(firmware);
    let router = Router::new()
        .fallback(move |request: Request| {
            let firmware = Arc::clone(&firmware);
            let path = request.uri().path().to_owned();
            async move { answer(&firmware, path).await }
        })
        .layer(
            ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |_: tower::BoxError| async { StatusCode::SERVICE_UNAVAILABLE },
                ))
                .load_shed()
                .concurrency_limit(REQUESTS_IN_FLIGHT_MAX)
                .timeout(REQUEST_TIMEOUT),
        );
    if let Err(error) = axum::serve(listener, router).await {
        tracing::warn!(%error, "serving firmware-stage files stopped");
    }
}

async fn answer(firmware: &PeerFirmware, path: String) -> Response {
    let Some(part) = firmware.part_for(&path).cloned() else {
        return (StatusCode::NOT_FOUND, "not served here\n").into_response();
    };
    let shelf = Arc::clone(&firmware.shelf);
    let read = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let mut bytes = Vec::with_capacity(usize::try_from(part.size_bytes).unwrap_or(0));
        for chunk in &part.chunks {
            match shelf.read(chunk) {
                Ok(Some(data)) => bytes.extend_from_slice(&data),
                Ok(None) => return Err(format!("chunk {} not held", chunk.hash)),
                Err(error) => return Err(error.to_string()),
            }
        }
        Ok(bytes)
    })
    .await;
    match read {
        Ok(Ok(bytes)) => {
            tracing::info!(%path, bytes = bytes.len(), "firmware-stage file served to a peer");
            (
                [(header::CONTENT_TYPE, "application/octet-stream")],
                Body::from(bytes),
            )
                .into_response()
        }
        Ok(Err(error)) => {
            tracing::error!(%path, %error, "a firmware-stage file failed verification; refused");
            (StatusCode::SERVICE_UNAVAILABLE, "not available\n").into_response()
        }
        Err(error) => {
            tracing::error!(%path, %error, "reading a firmware-stage file failed");
            (StatusCode::SERVICE_UNAVAILABLE, "not available\n").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shelf holding nothing: these tests never read.
    struct EmptyShelf;

    impl ChunkShelf for EmptyShelf {
        fn read(
            &self,
            _chunk: &transfer::ChunkRef,
        ) -> Result<Option<Arc<[u8]>>, crate::swarm::SwarmError> {
            Ok(None)
        }
        fn store(
            &self,
            _chunk: &transfer::ChunkRef,
            _bytes: &[u8],
        ) -> Result<(), crate::swarm::SwarmError> {
            Ok(())
        }
        fn holds(&self, _chunk: &transfer::ChunkRef) -> bool {
            false
        }
        fn sync(&self) -> Result<(), crate::swarm::SwarmError> {
            Ok(())
        }
    }

    #[test]
    fn only_the_booted_images_kernel_and_initrd_are_served() {
        let hash = ContentHash::of(b"image");
        let part = Part {
            size_bytes: 0,
            chunks: Vec::new(),
        };
        let firmware = PeerFirmware {
            manifest: hash,
            kernel: Some(part.clone()),
            initrd: None,
            shelf: Arc::new(EmptyShelf),
        };
        let path = |name: &str| format!("/images/{}/{name}", hash.to_hex());
        assert!(firmware.part_for(&path("kernel")).is_some());
        // No initrd in this image; nothing else is a file here.
        assert!(firmware.part_for(&path("initrd")).is_none());
        assert!(firmware.part_for(&path("root")).is_none());
        assert!(firmware.part_for(&path("kernel/../root")).is_none());
        let other = format!("/images/{}/kernel", ContentHash::of(b"other").to_hex());
        assert!(firmware.part_for(&other).is_none());
        assert!(firmware.part_for("/boot/52-54-00-00-00-01.ipxe").is_none());
    }
}
