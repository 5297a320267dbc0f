//! HTTP boot: iPXE, kernels, initrds, scripts and images from a directory, with Range requests
//! (tower-http's ServeDir), behind a guard that keeps every path inside the root, and a bound on
//! requests in flight that answers 503 instead of queueing without limit.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use boot_services::ipxe::{BootPlan, render_script};
use boot_services::source::{SourceError, normalise_path};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_http::services::ServeDir;

use crate::files::DirectorySource;
use crate::image_source::{ImageLibrary, image_path};

/// How long a request may take before it is cut off; a stalled client must not hold a slot.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Image parts up to this size are verified whole before the response starts, so that a
/// corrupt chunk gets a 5xx rather than a cut-off 200 (kernels and initrds always are).
const PREVERIFY_BYTES_MAX: u64 = 128 * 1024 * 1024;
/// Bytes per body frame when streaming an image part.
const STREAM_FRAME_BYTES: usize = 256 * 1024;

/// What `/boot/<mac>.ipxe` answers: the boot plan with URLs relative to the address the node
/// reached us on, and each known host's hostname.
///
/// A node boots its group's promoted image when the store has one (kernel and initrd from the
/// image, `bootmesh.image=<manifest hash>` on the command line); otherwise the static
/// `kernel`/`initrd` below.
#[derive(Debug, Clone, Default)]
pub struct BootScripts {
    /// Kernel path under the HTTP root.
    pub kernel: Option<String>,
    /// Initrd path under the HTTP root.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// Hostnames by MAC.
    pub hostnames: BTreeMap<[u8; 6], String>,
    /// Groups by MAC.
    pub groups: BTreeMap<[u8; 6], String>,
    /// The group of nodes not listed in `groups`.
    pub default_group: Option<String>,
    /// Extra command line per group.
    pub group_cmdlines: BTreeMap<String, String>,
    /// The image store.
    pub images: Option<ImageLibrary>,
}

/// Kernel URL, initrd URL and command line for one node.
struct PlannedFiles {
    kernel: String,
    initrd: Option<String>,
    cmdline: String,
}

impl BootScripts {
    /// What `mac` boots: its group's image, else the static files; `Err` is a message for a
    /// 5xx (a group whose image cannot be read must not silently boot something else).
    fn plan_files(&self, mac: &[u8; 6]) -> Result<Option<PlannedFiles>, String> {
        let group = self.groups.get(mac).or(self.default_group.as_ref());
        if let (Some(group), Some(images)) = (group, &self.images) {
            match images.group_image(group) {
                Ok(Some((reference, hash, manifest))) => {
                    if manifest.kernel.is_none() {
                        return Err(format!("image {reference} of group {group} has no kernel"));
                    }
                    let mut cmdline = vec![manifest.cmdline.clone()];
                    if let Some(extra) = self.group_cmdlines.get(group) {
                        cmdline.push(extra.clone());
                    }
                    cmdline.push(format!("bootmesh.image={hash}"));
                    cmdline.push(format!("bootmesh.group={group}"));
                    cmdline.retain(|part| !part.is_empty());
                    tracing::info!(%group, image = %reference, %hash, "boot plan from the group's image");
                    return Ok(Some(PlannedFiles {
                        kernel: format!("images/{hash}/kernel"),
                        initrd: manifest
                            .initrd
                            .as_ref()
                            .map(|_| format!("images/{hash}/initrd")),
                        cmdline: cmdline.join(" "),
                    }));
                }
                Ok(None) => {}
                Err(error) => return Err(format!("image of group {group} unreadable: {error}")),
            }
        }
        Ok(self.kernel.as_ref().map(|kernel| PlannedFiles {
            kernel: kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
        }))
    }
}

/// Builds the router serving `source`, the store's images, chunks and manifests, and boot
/// scripts.
pub fn router(
    source: DirectorySource,
    scripts: BootScripts,
    requests_in_flight_max: usize,
) -> Router {
    let serve_dir = ServeDir::new(source.root_path());
    let images = scripts.images.clone();
    Router::new()
        .fallback_service(serve_dir)
        .layer(middleware::from_fn_with_state(source, confine_to_root))
        .layer(middleware::from_fn_with_state(images, serve_from_store))
        .layer(middleware::from_fn_with_state(
            Arc::new(scripts),
            serve_boot_script,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |_: tower::BoxError| async { StatusCode::SERVICE_UNAVAILABLE },
                ))
                .load_shed()
                .concurrency_limit(requests_in_flight_max.max(1))
                .timeout(REQUEST_TIMEOUT),
        )
}

/// Parses `/boot/52-54-00-12-34-56.ipxe`.
fn boot_script_mac(path: &str) -> Option<[u8; 6]> {
    let name = path.strip_prefix("/boot/")?.strip_suffix(".ipxe")?;
    crate::config::parse_mac(name).ok()
}

async fn serve_boot_script(
    State(scripts): State<Arc<BootScripts>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(mac) = boot_script_mac(request.uri().path()) else {
        return next.run(request).await;
    };
    let span = tracing::info_span!("boot_script", mac = %boot_services::dhcp::format_mac(&mac));
    let _entered = span.enter();
    // URLs name the address the node used to reach us, so they work on every segment.
    let Some(host) = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|host| host.to_str().ok())
    else {
        return (StatusCode::BAD_REQUEST, "missing Host header\n").into_response();
    };
    let url = |path: &str| format!("http://{host}/{}", path.trim_start_matches('/'));
    let files = match scripts.plan_files(&mac) {
        Ok(Some(files)) => files,
        Ok(None) => {
            drop(_entered);
            return next.run(request).await;
        }
        Err(message) => {
            tracing::error!(%message, "no boot plan");
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("{message}\n")).into_response();
        }
    };
    let plan = BootPlan {
        kernel_urls: vec![url(&files.kernel)],
        initrd_urls: files.initrd.iter().map(|initrd| url(initrd)).collect(),
        cmdline: files.cmdline,
        hostname: scripts.hostnames.get(&mac).cloned(),
    };
    match render_script(&plan) {
        Ok(script) => {
            tracing::info!("boot script served");
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; charset=utf-8",
                )],
                script,
            )
                .into_response()
        }
        Err(error) => {
            tracing::warn!(%error, "boot script refused");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response()
        }
    }
}

/// `/images/<name:tag or hash>/<part>`, `/chunks/<hash>` and `/manifests/<hash>` from the
/// store; everything else passes on.
async fn serve_from_store(
    State(images): State<Option<ImageLibrary>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(images) = images else {
        return next.run(request).await;
    };
    let path = request.uri().path().to_owned();
    let Some(decoded) = percent_decode(&path) else {
        return next.run(request).await;
    };
    let trimmed = decoded.trim_start_matches('/');
    let span = tracing::info_span!("http_store", path = %trimmed);
    let _entered = span.enter();
    if let Some((name, part)) = image_path(trimmed) {
        let file = match images.open_part(name, part) {
            Ok(file) => file,
            Err(error) => return store_error_response(&error),
        };
        return stream_part(file).await;
    }
    if let Some(hex) = trimmed.strip_prefix("chunks/") {
        let Ok(hash) = hex.parse() else {
            return (StatusCode::NOT_FOUND, "not found\n").into_response();
        };
        return match images.chunk(&hash) {
            Ok(bytes) => (
                [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                Body::from(bytes.to_vec()),
            )
                .into_response(),
            Err(error) => store_error_response(&error),
        };
    }
    if let Some(hex) = trimmed.strip_prefix("manifests/") {
        let Ok(hash) = hex.parse() else {
            return (StatusCode::NOT_FOUND, "not found\n").into_response();
        };
        return match images.store().manifest_bytes(&hash) {
            Ok(bytes) => (
                [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                Body::from(bytes),
            )
                .into_response(),
            Err(transfer::StoreError::ManifestMissing { .. }) => {
                (StatusCode::NOT_FOUND, "not found\n").into_response()
            }
            Err(error) => {
                tracing::error!(%error, "manifest refused");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "stored manifest is unreadable\n",
                )
                    .into_response()
            }
        };
    }
    drop(_entered);
    next.run(request).await
}

fn store_error_response(error: &SourceError) -> Response {
    match error {
        SourceError::NotFound => (StatusCode::NOT_FOUND, "not found\n").into_response(),
        SourceError::AccessDenied => (StatusCode::FORBIDDEN, "forbidden\n").into_response(),
        SourceError::Corrupt => {
            tracing::error!("stored data is corrupt; answering 500 instead of sending it");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "stored data is corrupt\n",
            )
                .into_response()
        }
        SourceError::Io(detail) => {
            tracing::warn!(%detail, "image read failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "read error\n").into_response()
        }
    }
}

/// Streams an image part, every chunk verified. Small parts are verified whole first (a 5xx
/// on corruption); a large part stops mid-stream on a bad chunk, which the client sees as a
/// cut-off transfer, never as bad bytes.
async fn stream_part(file: crate::image_source::StoreFile) -> Response {
    use boot_services::source::ReadAt;
    let size_bytes = file.size_bytes();
    let mut probe = vec![0u8; STREAM_FRAME_BYTES];
    let mut offset = 0u64;
    let preverify_end = if size_bytes <= PREVERIFY_BYTES_MAX {
        size_bytes
    } else {
        1
    };
    while offset < preverify_end {
        match file.read_at(offset, &mut probe) {
            Ok(0) => break,
            Ok(count) => offset += count as u64,
            Err(error) => return store_error_response(&error),
        }
    }
    let frames = futures_util::stream::unfold((file, 0u64), move |(file, offset)| async move {
        if offset >= size_bytes {
            return None;
        }
        let wanted = usize::try_from(size_bytes - offset)
            .unwrap_or(usize::MAX)
            .min(STREAM_FRAME_BYTES);
        let mut frame = vec![0u8; wanted];
        match file.read_at(offset, &mut frame) {
            Ok(count) if count > 0 => {
                frame.truncate(count);
                Some((
                    Ok::<_, std::io::Error>(frame),
                    (file, offset + count as u64),
                ))
            }
            Ok(_) => Some((
                Err(std::io::Error::other("image part ended early")),
                (file, size_bytes),
            )),
            Err(error) => {
                tracing::error!(%error, offset, "image stream cut off");
                Some((
                    Err(std::io::Error::other(error.to_string())),
                    (file, size_bytes),
                ))
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(axum::http::header::CONTENT_TYPE, "application/octet-stream")
        .header(axum::http::header::CONTENT_LENGTH, size_bytes)
        .body(Body::from_stream(frames))
        .unwrap_or_default()
}

async fn confine_to_root(
    State(source): State<DirectorySource>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let span = tracing::debug_span!("http", method = %request.method(), path = %path);
    let _entered = span.enter();
    let decoded = percent_decode(&path);
    let checked = decoded
        .ok_or(SourceError::AccessDenied)
        .and_then(|decoded| normalise_path(&decoded))
        .and_then(|normalised| source.resolve(&normalised));
    match checked {
        Ok(_) => {
            drop(_entered);
            let response = next.run(request).await;
            tracing::debug!(status = %response.status(), path = %path, "http response");
            response
        }
        Err(SourceError::NotFound) => (StatusCode::NOT_FOUND, "not found\n").into_response(),
        Err(SourceError::AccessDenied) => {
            tracing::info!(path = %path, "http path refused: outside the served root");
            (StatusCode::FORBIDDEN, "forbidden\n").into_response()
        }
        Err(error) => {
            tracing::warn!(path = %path, %error, "http read failed");
            Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(Body::from("read error\n"))
                .unwrap_or_default()
        }
    }
}

/// Decodes %XX escapes; `None` for malformed escapes or non-UTF-8 results.
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if byte == b'%' {
            let high = bytes
                .get(index + 1)
                .and_then(|digit| (*digit as char).to_digit(16))?;
            let low = bytes
                .get(index + 2)
                .and_then(|digit| (*digit as char).to_digit(16))?;
            decoded.push((high * 16 + low) as u8);
            index += 3;
        } else {
            decoded.push(byte);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// Serves HTTP on `listener` until `shutdown` resolves.
pub async fn run_http(
    listener: TcpListener,
    source: DirectorySource,
    scripts: BootScripts,
    requests_in_flight_max: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?address, "http listening");
    axum::serve(listener, router(source, scripts, requests_in_flight_max))
        .with_graceful_shutdown(shutdown)
        .await
}
