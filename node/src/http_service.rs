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

/// How long a request may take before it is cut off; a stalled client must not hold a slot.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// What `/boot/<mac>.ipxe` answers: the boot plan with URLs relative to the address the node
/// reached us on, and each known host's hostname.
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
}

/// Builds the router serving `source`, and boot scripts when `scripts` has a kernel.
pub fn router(
    source: DirectorySource,
    scripts: BootScripts,
    requests_in_flight_max: usize,
) -> Router {
    let serve_dir = ServeDir::new(source.root_path());
    Router::new()
        .fallback_service(serve_dir)
        .layer(middleware::from_fn_with_state(source, confine_to_root))
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
    let Some(kernel) = &scripts.kernel else {
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
    let plan = BootPlan {
        kernel_urls: vec![url(kernel)],
        initrd_urls: scripts.initrd.iter().map(|initrd| url(initrd)).collect(),
        cmdline: scripts.cmdline.clone(),
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
