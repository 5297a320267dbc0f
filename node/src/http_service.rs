//! HTTP boot: iPXE, kernels, initrds, scripts and images from a directory, with Range requests
//! (tower-http's ServeDir), behind a guard that keeps every path inside the root, and a bound on
//! requests in flight that answers 503 instead of queueing without limit. Agents get their node
//! plan (`/nodes/<mac>/plan`) and, once per boot token, their secrets (`/nodes/<mac>/secrets`).
//!
//! Boot tokens and secret values never reach the log: no handler logs a query string, a
//! command line, a script or a response body.

pub mod boot_tokens;
pub mod dashboard;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use boot_services::ipxe::{BootPlan, render_script};
use boot_services::source::{SourceError, normalise_path};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_http::services::ServeDir;
use tracing::Instrument as _;

use crate::boots::BootRecorder;
use crate::config::{BOOT_TOKEN_TTL_SECS_DEFAULT, parse_mac};
use crate::files::DirectorySource;
use crate::image_source::{ImageLibrary, image_path};
use crate::plan::NodePlans;
use crate::seams::{Clock as _, SystemClock, monotonic_now, os_random_bytes};
use crate::timeline::{AgentReport, Observation};
use boot_tokens::{BootToken, BootTokens, TokenRefusal};

/// How long a request may take before it is cut off; a stalled client must not hold a slot.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Image parts up to this size are verified whole before the response starts, so that a
/// corrupt chunk gets a 5xx rather than a cut-off 200 (kernels and initrds always are).
const PREVERIFY_BYTES_MAX: u64 = 128 * 1024 * 1024;
/// Bytes per body frame when streaming an image part.
const STREAM_FRAME_BYTES: usize = 256 * 1024;

/// What `/boot/<mac>.ipxe` and `/nodes/<mac>/...` answer: the boot plan with URLs relative to
/// the address the node reached us on, and each node's plan and secrets.
///
/// A node boots its group's promoted image when the store has one (kernel and initrd from the
/// image, `bootmesh.image=<manifest hash>` on the command line, with the agent's `bootmesh.mac`,
/// `bootmesh.servers` and a fresh `bootmesh.token`); otherwise the static `kernel`/`initrd`
/// below.
#[derive(Debug, Clone)]
pub struct BootScripts {
    /// Kernel path under the HTTP root.
    pub kernel: Option<String>,
    /// Initrd path under the HTTP root.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// Every node's plan (hostname and group included) and secrets.
    pub plans: NodePlans,
    /// Extra command line per group.
    pub group_cmdlines: BTreeMap<String, String>,
    /// The image store.
    pub images: Option<ImageLibrary>,
    /// HTTP addresses of the other boot servers, named after our own in `bootmesh.servers`.
    pub servers: Vec<SocketAddr>,
    /// The servers' swarm endpoints (`bootmesh.trackers`: a `ram` root comes from the swarm).
    /// An unspecified IP (`0.0.0.0:7800`) stands for the address the node reached us on.
    pub trackers: Vec<SocketAddr>,
    /// How long a boot token stays redeemable.
    pub token_time_to_live: Duration,
}

impl Default for BootScripts {
    fn default() -> Self {
        Self {
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            plans: NodePlans::default(),
            group_cmdlines: BTreeMap::new(),
            images: None,
            servers: Vec::new(),
            trackers: Vec::new(),
            token_time_to_live: Duration::from_secs(BOOT_TOKEN_TTL_SECS_DEFAULT),
        }
    }
}

/// Kernel URL, initrd URL and command line for one node.
struct PlannedFiles {
    kernel: String,
    initrd: Option<String>,
    cmdline: String,
    /// Whether these are a group's image, which the agent boots (and so needs its identity).
    from_group_image: bool,
    /// The group image's catalog reference (`node:v2`), for the node's timeline.
    image: Option<String>,
    /// The group image's manifest.
    manifest: Option<transfer::ContentHash>,
}

impl BootScripts {
    /// What `mac` boots: its group's image, else the static files; `Err` is a message for a
    /// 5xx (a group whose image cannot be read must not silently boot something else).
    fn plan_files(&self, mac: &[u8; 6]) -> Result<Option<PlannedFiles>, String> {
        let group = self.plans.plan(mac).group.as_ref();
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
                        from_group_image: true,
                        image: Some(reference.to_string()),
                        manifest: Some(hash),
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
            from_group_image: false,
            image: None,
            manifest: None,
        }))
    }
}

/// What the boot-script and node-document handlers share.
#[derive(Debug)]
struct BootState {
    scripts: BootScriptsHandle,
    tokens: Mutex<BootTokens>,
    boots: Arc<BootRecorder>,
    /// This server's image tracker, which knows the booted nodes that may serve a group's
    /// firmware-stage files (`firmware_from_peers`); none without `[swarm]`.
    firmware_peers: Option<crate::swarm::FirmwarePeerSource>,
}

/// The boot scripts being served, replaceable while serving (a cluster's fleet configuration
/// changed): each request works on the scripts as they were when it started.
#[derive(Debug, Clone)]
pub struct BootScriptsHandle(Arc<std::sync::RwLock<Arc<BootScripts>>>);

impl BootScriptsHandle {
    /// A handle serving `scripts`.
    pub fn new(scripts: BootScripts) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Arc::new(scripts))))
    }

    /// The scripts now.
    pub fn current(&self) -> Arc<BootScripts> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Serves `scripts` from the next request on.
    pub fn replace(&self, scripts: BootScripts) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(scripts);
    }
}

impl BootState {
    /// Records a boot stage of node `mac`, now.
    fn observe(&self, mac: &[u8; 6], observation: Observation) {
        self.boots.observe(SystemClock.wall_now(), mac, observation);
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, BootTokens> {
        // The table stays consistent between calls, so a panic elsewhere leaves it usable.
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Builds the router serving `source`, the store's images, chunks and manifests, and boot
/// scripts.
pub fn router(
    source: DirectorySource,
    scripts: BootScriptsHandle,
    boots: Arc<BootRecorder>,
    firmware_peers: Option<crate::swarm::FirmwarePeerSource>,
    requests_in_flight_max: usize,
) -> Router {
    let state = Arc::new(BootState {
        tokens: Mutex::new(BootTokens::new(scripts.current().token_time_to_live)),
        scripts,
        boots,
        firmware_peers,
    });
    router_with_state(source, state, requests_in_flight_max)
}

fn router_with_state(
    source: DirectorySource,
    state: Arc<BootState>,
    requests_in_flight_max: usize,
) -> Router {
    let serve_dir = ServeDir::new(source.root_path());
    let images = state.scripts.current().images.clone();
    // The last layer added sees a request first: node documents never reach the file
    // handlers, whose logs name the path.
    Router::new()
        .fallback_service(serve_dir)
        .layer(middleware::from_fn_with_state(source, confine_to_root))
        .layer(middleware::from_fn_with_state(images, serve_from_store))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            serve_boot_script,
        ))
        .layer(middleware::from_fn_with_state(state, serve_node_documents))
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

/// Booted peers a boot script names before this server, per file.
const FIRMWARE_PEERS_MAX: usize = 2;

/// The address a request came from, when the listener records it.
fn client_ip(request: &Request) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip())
}

/// Parses `/boot/52-54-00-12-34-56.ipxe`.
fn boot_script_mac(path: &str) -> Option<[u8; 6]> {
    let name = path.strip_prefix("/boot/")?.strip_suffix(".ipxe")?;
    crate::config::parse_mac(name).ok()
}

async fn serve_boot_script(
    State(state): State<Arc<BootState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(mac) = boot_script_mac(request.uri().path()) else {
        return next.run(request).await;
    };
    let span = tracing::info_span!("boot_script", mac = %boot_services::dhcp::format_mac(&mac));
    // URLs name the address the node used to reach us, so they work on every segment.
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .map(str::to_owned);
    let client = client_ip(&request);
    match boot_script(&state, mac, host, client)
        .instrument(span)
        .await
    {
        Some(response) => response,
        None => next.run(request).await,
    }
}

/// The boot script for node `mac`, asked for through `host` from `client`; `None` when no
/// plan names a kernel for it (the request goes on to the file handlers).
async fn boot_script(
    state: &BootState,
    mac: [u8; 6],
    host: Option<String>,
    client: Option<std::net::IpAddr>,
) -> Option<Response> {
    let scripts = state.scripts.current();
    let Some(host) = host else {
        return Some((StatusCode::BAD_REQUEST, "missing Host header\n").into_response());
    };
    let host = host.as_str();
    let url = |path: &str| format!("http://{host}/{}", path.trim_start_matches('/'));
    let files = match scripts.plan_files(&mac) {
        Ok(Some(files)) => files,
        Ok(None) => return None,
        Err(message) => {
            tracing::error!(%message, "no boot plan");
            return Some(
                (StatusCode::INTERNAL_SERVER_ERROR, format!("{message}\n")).into_response(),
            );
        }
    };
    // A group that opts in boots from booted nodes of its image in the node's rack first,
    // then from this server (ADR 0016).
    let peers = match (&files.manifest, &state.firmware_peers, client) {
        (Some(manifest), Some(source), Some(client))
            if scripts.plans.plan(&mac).firmware_from_peers =>
        {
            let servers: Vec<std::net::IpAddr> = scripts
                .servers
                .iter()
                .chain(&scripts.trackers)
                .map(SocketAddr::ip)
                .chain(host_address(host).map(|reached| reached.ip()))
                .collect();
            let peers = source
                .firmware_peers(manifest, client, &servers, FIRMWARE_PEERS_MAX)
                .await;
            tracing::info!(?peers, "kernel and initrd from booted peers first");
            peers
        }
        _ => Vec::new(),
    };
    let urls = |path: &str| -> Vec<String> {
        peers
            .iter()
            .map(|peer| {
                format!(
                    "http://{}/{}",
                    SocketAddr::new(*peer, crate::plan::PEER_FIRMWARE_PORT),
                    path.trim_start_matches('/')
                )
            })
            .chain(std::iter::once(url(path)))
            .collect()
    };
    let mut plan = BootPlan {
        kernel_urls: urls(&files.kernel),
        initrd_urls: files
            .initrd
            .iter()
            .flat_map(|initrd| urls(initrd))
            .collect(),
        cmdline: files.cmdline,
        hostname: scripts.plans.plan(&mac).hostname.clone(),
    };
    if !files.from_group_image {
        return Some(match render_script(&plan) {
            Ok(script) => {
                tracing::info!("boot script served");
                state.observe(&mac, Observation::BootScript { image: None });
                script_response(script)
            }
            Err(error) => script_refused(&error),
        });
    }
    // The agent's identity for this boot: the NIC that booted, the servers to ask, and the
    // token that buys its secrets once.
    push_argument(
        &mut plan.cmdline,
        &format!("bootmesh.mac={}", crate::timeline::colon_mac(&mac)),
    );
    let servers = boot_servers(host, &scripts.servers);
    if !servers.is_empty() {
        let list: Vec<String> = servers.iter().map(SocketAddr::to_string).collect();
        push_argument(
            &mut plan.cmdline,
            &format!("bootmesh.servers={}", list.join(",")),
        );
    }
    let trackers: Vec<String> = scripts
        .trackers
        .iter()
        .filter_map(|tracker| {
            if tracker.ip().is_unspecified() {
                host_address(host).map(|reached| SocketAddr::new(reached.ip(), tracker.port()))
            } else {
                Some(*tracker)
            }
        })
        .map(|tracker| tracker.to_string())
        .collect();
    if !trackers.is_empty() {
        push_argument(
            &mut plan.cmdline,
            &format!("bootmesh.trackers={}", trackers.join(",")),
        );
    }
    // Rendered once before the token is added: a refusal quotes the command line, and it
    // must not quote a token.
    if let Err(error) = render_script(&plan) {
        return Some(script_refused(&error));
    }
    let token = match os_random_bytes() {
        Ok(bytes) => BootToken::from_bytes(bytes),
        Err(error) => {
            tracing::error!(%error, "no randomness from the OS for a boot token");
            return Some(
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no randomness for a boot token\n",
                )
                    .into_response(),
            );
        }
    };
    push_argument(
        &mut plan.cmdline,
        &format!("bootmesh.token={}", token.to_hex()),
    );
    let Ok(script) = render_script(&plan) else {
        // A hex token cannot make a script unsafe that rendered without it; the error is not
        // logged because it would quote the token.
        tracing::error!("boot script refused once its token was added");
        return Some((StatusCode::INTERNAL_SERVER_ERROR, "boot script refused\n").into_response());
    };
    state.tokens().issue(monotonic_now(), mac, token);
    tracing::info!("boot script served with a fresh boot token");
    state.observe(&mac, Observation::BootScript { image: files.image });
    Some(script_response(script))
}

fn script_response(script: String) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        script,
    )
        .into_response()
}

fn script_refused(error: &boot_services::ipxe::ScriptError) -> Response {
    tracing::warn!(%error, "boot script refused");
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response()
}

/// Appends one `key=value` argument to a kernel command line.
fn push_argument(cmdline: &mut String, argument: &str) {
    if !cmdline.is_empty() {
        cmdline.push(' ');
    }
    cmdline.push_str(argument);
}

/// `52:54:00:12:34:56`: the form the agent and `parse_mac` read.
/// `bootmesh.servers`: the address the node reached us on, then the other servers, each once.
/// IP literals only, because the agent has no resolver: a Host header naming us by DNS name
/// leaves only the configured servers.
fn boot_servers(host: &str, others: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut servers: Vec<SocketAddr> = host_address(host).into_iter().collect();
    for server in others {
        if !servers.contains(server) {
            servers.push(*server);
        }
    }
    servers
}

/// The address in a Host header: `ip:port`, `[v6]:port`, or an IP alone (port 80).
fn host_address(host: &str) -> Option<SocketAddr> {
    if let Ok(address) = host.parse::<SocketAddr>() {
        return Some(address);
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>()
        .ok()
        .map(|address| SocketAddr::new(address, 80))
}

/// The documents under `/nodes/<mac>/`.
#[derive(Debug, Clone, Copy)]
enum NodeDocument {
    Plan,
    Secrets,
    Report,
}

/// Bytes of an agent's report; it names at most a few peers.
const REPORT_BYTES_MAX: usize = 4096;

/// `GET /nodes/<mac>/plan`, `GET /nodes/<mac>/secrets?token=<hex>` and
/// `POST /nodes/<mac>/report` (an agent's boot stage); every other path passes on. The MAC may
/// take any form `parse_mac` reads.
async fn serve_node_documents(
    State(state): State<Arc<BootState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(rest) = request.uri().path().strip_prefix("/nodes/") else {
        return next.run(request).await;
    };
    let not_found = || (StatusCode::NOT_FOUND, "not found\n").into_response();
    // Decoded, so that `52%3A54%3A...` names the same node as `52:54:...`.
    let Some(decoded) = percent_decode(rest) else {
        return not_found();
    };
    let Some((mac_text, document)) = decoded.split_once('/') else {
        return not_found();
    };
    let Ok(mac) = parse_mac(mac_text) else {
        return not_found();
    };
    let document = match document {
        "plan" => NodeDocument::Plan,
        "secrets" => NodeDocument::Secrets,
        "report" => NodeDocument::Report,
        _ => return not_found(),
    };
    // The span names the node and the document, never the query (which holds the token).
    let span = tracing::info_span!(
        "node_document",
        mac = %boot_services::dhcp::format_mac(&mac),
        ?document
    );
    let _entered = span.enter();
    // Not even HEAD: a HEAD of the secrets would spend the token and deliver nothing.
    let allowed = match document {
        NodeDocument::Plan | NodeDocument::Secrets => Method::GET,
        NodeDocument::Report => Method::POST,
    };
    if request.method() != allowed {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, allowed.as_str())],
            format!("only {allowed}\n"),
        )
            .into_response();
    }
    match document {
        NodeDocument::Plan => {
            let scripts = state.scripts.current();
            let plan = scripts.plans.plan(&mac);
            tracing::info!(
                group = plan.group.as_deref().unwrap_or("-"),
                "node plan served"
            );
            state.observe(
                &mac,
                Observation::Plan {
                    hostname: plan.hostname.clone(),
                },
            );
            json_response(plan)
        }
        NodeDocument::Report => {
            let report = match axum::body::to_bytes(request.into_body(), REPORT_BYTES_MAX)
                .await
                .map_err(|error| error.to_string())
                .and_then(|body| {
                    serde_json::from_slice::<AgentReport>(&body).map_err(|error| error.to_string())
                })
                .and_then(|report| {
                    report
                        .validate()
                        .map(|()| report)
                        .map_err(|error| error.to_string())
                }) {
                Ok(report) => report,
                Err(reason) => {
                    state.boots.count_refused_report();
                    tracing::info!(%reason, "agent report refused");
                    return (
                        StatusCode::BAD_REQUEST,
                        format!("report refused: {reason}\n"),
                    )
                        .into_response();
                }
            };
            tracing::info!(stage = report.stage.as_str(), "agent report");
            state.observe(&mac, Observation::Report(report));
            (StatusCode::NO_CONTENT, "").into_response()
        }
        NodeDocument::Secrets => {
            let Some(presented) = request.uri().query().and_then(token_parameter) else {
                tracing::info!("secrets refused: no token given");
                return (StatusCode::FORBIDDEN, "no boot token given\n").into_response();
            };
            // A token that does not even parse is as wrong as one that does not match.
            let redeemed = match BootToken::parse_hex(presented) {
                Some(token) => state.tokens().redeem(monotonic_now(), &mac, &token),
                None => Err(TokenRefusal::Mismatch),
            };
            if let Err(refusal) = redeemed {
                tracing::info!(%refusal, "secrets refused");
                return (StatusCode::FORBIDDEN, format!("{refusal}\n")).into_response();
            }
            let scripts = state.scripts.current();
            let secrets = scripts.plans.secrets(&mac);
            tracing::info!(
                secrets = secrets.secrets.len(),
                "secrets served; boot token spent"
            );
            json_response(secrets)
        }
    }
}

/// The value of `token=` in a query string.
fn token_parameter(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|parameter| parameter.strip_prefix("token="))
}

/// `value` as JSON, never cached: plans change with the configuration, secrets are for one
/// reader.
fn json_response(value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "json encoding failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response()
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

/// Whether the server is ready to serve nodes, for `/readyz` (a Kubernetes readiness probe, a
/// load balancer's health check): not while it starts, nor while its cluster has no leader
/// (no new lease could be committed).
#[derive(Debug, Clone)]
pub struct Readiness(Arc<std::sync::RwLock<Option<String>>>);

impl Readiness {
    /// Not ready yet: starting.
    pub fn starting() -> Self {
        Self(Arc::new(std::sync::RwLock::new(Some(
            "starting".to_owned(),
        ))))
    }

    /// Ready.
    pub fn set_ready(&self) {
        self.set(None);
    }

    /// Not ready, and why.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.set(Some(reason.into()));
    }

    fn set(&self, reason: Option<String>) {
        let mut current = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *current != reason {
            match &reason {
                None => tracing::info!("ready"),
                Some(why) => tracing::warn!(reason = %why, "not ready"),
            }
            *current = reason;
        }
    }

    /// Why the server is not ready, if it is not.
    pub fn not_ready_because(&self) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// What the operator's tools ask a server: `/healthz`, `/readyz`, `/metrics`; and the HTTP
/// counters every other response is counted in.
#[derive(Debug, Clone)]
pub struct Probes {
    /// For `/readyz`.
    pub readiness: Readiness,
    /// For `/metrics`.
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// Responses served.
    pub http: Arc<crate::metrics::HttpCounters>,
    /// The boots this server took part in (`/api/v1/nodes`).
    pub boots: Arc<BootRecorder>,
    /// The cluster member, whose peers `/api/v1/nodes` asks for their part of each boot.
    pub member: Option<crate::cluster::member::ClusterMember>,
    /// The rack of each node's address, for `/api/v1/nodes`.
    pub racks: crate::racks::RackMap,
}

/// `/healthz` (the process answers: a liveness probe), `/readyz` (see [`Readiness`]),
/// `/metrics` (Prometheus), `/api/v1/nodes`, `/api/v1/cluster` and the dashboard
/// (`/dashboard`); every other request goes on, and its response is counted.
async fn serve_probes(State(probes): State<Probes>, request: Request, next: Next) -> Response {
    match request.uri().path() {
        "/healthz" => (StatusCode::OK, "ok\n").into_response(),
        "/readyz" => match probes.readiness.not_ready_because() {
            None => (StatusCode::OK, "ready\n").into_response(),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            )
                .into_response(),
        },
        "/api/v1/nodes" => nodes_response(&probes, request.uri().query()).await,
        "/api/v1/cluster" => {
            let not_ready_because = probes.readiness.not_ready_because();
            json_response(&dashboard::ClusterView {
                server: probes.boots.server_name(),
                ready: not_ready_because.is_none(),
                not_ready_because,
                cluster: probes.member.as_ref().map(|member| member.status()),
                catalog: probes.member.as_ref().map(dashboard::CatalogView::of),
            })
        }
        path if path.starts_with("/dashboard") => match dashboard::asset(path) {
            Some(response) => response,
            None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
        },
        "/metrics" => match crate::metrics::render(&probes.metrics) {
            Ok(text) => (
                [(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                text,
            )
                .into_response(),
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        },
        _ => {
            let response = next.run(request).await;
            let length = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok());
            probes.http.count(response.status().as_u16(), length);
            response
        }
    }
}

/// What `/api/v1/nodes` answers: every node's latest boot as the servers saw it together,
/// and which servers answered.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodesView {
    /// The servers asked, and what became of asking each.
    pub servers: Vec<ServerAsked>,
    /// How many nodes the servers know, before any filter.
    #[serde(default)]
    pub nodes_known: usize,
    /// One merged timeline per node that passed the filter, by MAC.
    pub nodes: Vec<crate::timeline::NodeTimeline>,
}

/// A server `/api/v1/nodes` asked.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServerAsked {
    /// Its cluster address, or the host name of a server outside a cluster.
    pub server: String,
    /// Why it did not answer; `None` when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `/api/v1/nodes`: this server's timelines merged with every other member's (asked over the
/// admin channel, each within a few seconds; one that does not answer is named, not waited
/// for), filtered by `?stage=&rack=&image=` (an unknown filter is a 400 that says why).
async fn nodes_response(probes: &Probes, query: Option<&str>) -> Response {
    let filter = match crate::nodes_cli::NodesFilter::from_query(query.unwrap_or_default()) {
        Ok(filter) => filter,
        Err(reason) => return (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response(),
    };
    let mut views = vec![probes.boots.snapshot()];
    let mut servers = vec![ServerAsked {
        server: probes.boots.server_name(),
        error: None,
    }];
    if let Some(member) = &probes.member {
        for (address, answer) in member.boot_timelines_of_other_members().await {
            let error = match answer {
                Ok(timelines) => {
                    views.push(timelines);
                    None
                }
                Err(error) => Some(error),
            };
            servers.push(ServerAsked {
                server: address.to_string(),
                error,
            });
        }
    }
    let mut nodes = crate::timeline::merge(views);
    let nodes_known = nodes.len();
    for node in &mut nodes {
        node.rack = node
            .address
            .and_then(|address| probes.racks.rack_of(address));
    }
    nodes.retain(|node| filter.matches(node));
    json_response(&NodesView {
        servers,
        nodes_known,
        nodes,
    })
}

/// Serves HTTP on `listener` until `shutdown` resolves.
pub async fn run_http(
    listener: TcpListener,
    source: DirectorySource,
    scripts: BootScriptsHandle,
    probes: Probes,
    firmware_peers: Option<crate::swarm::FirmwarePeerSource>,
    requests_in_flight_max: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?address, "http listening");
    // Probes answer before the load-shedding layers: a busy server is alive, not dead.
    let router = router(
        source,
        scripts,
        Arc::clone(&probes.boots),
        firmware_peers,
        requests_in_flight_max,
    )
    .layer(middleware::from_fn_with_state(probes, serve_probes));
    // The peer's address: a booting node's rack, for `firmware_from_peers`.
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{NodeEntry, NodePlan, NodeSecrets, Secret};
    use tower::ServiceExt as _;

    const KNOWN_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const TOKEN: [u8; 16] = [0x5a; 16];

    fn state() -> Arc<BootState> {
        let known = NodeEntry {
            plan: NodePlan {
                hostname: Some("worker-1".into()),
                group: Some("gpus".into()),
                ..NodePlan::default()
            },
            secrets: NodeSecrets {
                secrets: BTreeMap::from([("join".into(), Secret::new("s3cret"))]),
            },
        };
        let default = NodeEntry {
            plan: NodePlan {
                group: Some("workers".into()),
                ..NodePlan::default()
            },
            secrets: NodeSecrets::default(),
        };
        let scripts = BootScripts {
            plans: NodePlans::new(default, BTreeMap::from([(KNOWN_MAC, known)])),
            ..BootScripts::default()
        };
        Arc::new(BootState {
            tokens: Mutex::new(BootTokens::new(scripts.token_time_to_live)),
            scripts: BootScriptsHandle::new(scripts),
            boots: Arc::new(BootRecorder::new("s1")),
            firmware_peers: None,
        })
    }

    /// Sends one request; returns the status and the body.
    async fn send(state: &Arc<BootState>, method: Method, uri: &str) -> (StatusCode, String) {
        send_body(state, method, uri, "").await
    }

    /// Sends one request with `body`; returns the status and the body.
    async fn send_body(
        state: &Arc<BootState>,
        method: Method,
        uri: &str,
        body: &str,
    ) -> (StatusCode, String) {
        let root = tempfile::tempdir().unwrap();
        let source = DirectorySource::new(root.path()).unwrap();
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = router_with_state(source, Arc::clone(state), 4)
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn probes_say_alive_and_whether_ready_and_count_what_is_served() {
        let readiness = Readiness::starting();
        let http = Arc::new(crate::metrics::HttpCounters::default());
        let boots = Arc::new(BootRecorder::new("s1"));
        boots.observe(
            std::time::SystemTime::UNIX_EPOCH,
            &KNOWN_MAC,
            Observation::BootScript { image: None },
        );
        let probes = Probes {
            readiness: readiness.clone(),
            metrics: Arc::new(crate::metrics::registry(crate::metrics::MetricsSources {
                readiness: readiness.clone(),
                http: Arc::clone(&http),
                dhcp: None,
                tftp: None,
                nbd: None,
                swarm: None,
                member: None,
                boots: Arc::clone(&boots),
            })),
            http: Arc::clone(&http),
            boots: Arc::clone(&boots),
            member: None,
            racks: crate::racks::RackMap::default(),
        };
        let probe = |path: &'static str| {
            let app = Router::new()
                .fallback(|| async { StatusCode::NOT_FOUND })
                .layer(middleware::from_fn_with_state(probes.clone(), serve_probes));
            async move {
                let request = Request::builder().uri(path).body(Body::empty()).unwrap();
                let response = app.oneshot(request).await.unwrap();
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (status, String::from_utf8(body.to_vec()).unwrap())
            }
        };
        assert_eq!(probe("/healthz").await, (StatusCode::OK, "ok\n".into()));
        assert_eq!(
            probe("/readyz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: starting\n".into()
            )
        );
        assert!(probe("/metrics").await.1.contains("bootmesh_ready 0"));
        readiness.set_ready();
        assert_eq!(probe("/readyz").await, (StatusCode::OK, "ready\n".into()));
        readiness.set_not_ready("no cluster leader known");
        assert_eq!(probe("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(probe("/other").await.0, StatusCode::NOT_FOUND);
        let (status, metrics) = probe("/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            metrics.contains("bootmesh_http_responses_total{class=\"4xx\"} 1"),
            "the 404 was counted, the probes were not:\n{metrics}"
        );
        let (status, nodes) = probe("/api/v1/nodes").await;
        assert_eq!(status, StatusCode::OK);
        let nodes: NodesView = serde_json::from_str(&nodes).unwrap();
        assert_eq!(nodes.servers.len(), 1);
        assert_eq!(nodes.servers[0].server, "s1");
        assert_eq!(nodes.nodes.len(), 1);
        assert_eq!(nodes.nodes[0].mac, "52:54:00:00:00:01");
        let (status, cluster) = probe("/api/v1/cluster").await;
        assert_eq!(status, StatusCode::OK);
        let cluster: dashboard::ClusterView = serde_json::from_str(&cluster).unwrap();
        assert!(!cluster.ready && cluster.cluster.is_none());
        assert_eq!(
            cluster.not_ready_because.as_deref(),
            Some("no cluster leader known")
        );
        let (status, page) = probe("/dashboard").await;
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains("/dashboard/app.js"), "{page}");
        assert!(probe("/dashboard/app.js").await.1.contains("/api/v1/nodes"));
        assert_eq!(probe("/dashboard/other").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn plans_and_agent_reports_become_the_node_timeline() {
        let state = state();
        let (status, _) = send(&state, Method::GET, "/nodes/52:54:00:00:00:01/plan").await;
        assert_eq!(status, StatusCode::OK);
        let report = r#"{"stage":"image","sources":{"server_bytes":100,"peer_bytes":900,"peers":["10.9.0.21:7800"]}}"#;
        let uri = "/nodes/52-54-00-00-00-01/report";
        assert_eq!(
            send_body(&state, Method::POST, uri, report).await.0,
            StatusCode::NO_CONTENT
        );
        // Refused, and nothing recorded: a stage servers see, a field no agent sends, not JSON,
        // too long, and a GET.
        for (method, body) in [
            (Method::POST, r#"{"stage":"dhcp"}"#.to_owned()),
            (Method::POST, r#"{"stage":"booted","by":"me"}"#.to_owned()),
            (Method::POST, "booted".to_owned()),
            (
                Method::POST,
                format!(r#"{{"stage":"booted","x":"{}"}}"#, "a".repeat(5000)),
            ),
        ] {
            let (status, text) = send_body(&state, method, uri, &body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body:.60}");
            assert!(text.starts_with("report refused: "), "{text}");
        }
        assert_eq!(
            send(&state, Method::GET, uri).await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let timelines = state.boots.snapshot();
        assert_eq!(timelines.len(), 1);
        let timeline = &timelines[0];
        assert_eq!(timeline.hostname.as_deref(), Some("worker-1"));
        let stages: Vec<&str> = timeline
            .stages
            .iter()
            .map(|seen| seen.stage.as_str())
            .collect();
        assert_eq!(stages, vec!["plan", "image"]);
        assert_eq!(
            timeline.sources.as_ref().map(|sources| sources.peer_bytes),
            Some(900)
        );
    }

    #[tokio::test]
    async fn plans_are_served_for_known_and_unknown_macs_in_any_mac_form() {
        let state = state();
        for uri in [
            "/nodes/52:54:00:00:00:01/plan",
            "/nodes/52-54-00-00-00-01/plan",
            "/nodes/52%3A54%3A00%3A00%3A00%3A01/plan",
        ] {
            let (status, body) = send(&state, Method::GET, uri).await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            let plan: NodePlan = serde_json::from_str(&body).unwrap();
            assert_eq!(plan.hostname.as_deref(), Some("worker-1"), "{uri}");
        }
        let (status, body) = send(&state, Method::GET, "/nodes/02:00:00:00:00:09/plan").await;
        assert_eq!(status, StatusCode::OK);
        let plan: NodePlan = serde_json::from_str(&body).unwrap();
        assert_eq!(plan.group.as_deref(), Some("workers"));
        for uri in [
            "/nodes/52:54:00:00:01/plan",
            "/nodes/52:54:00:00:00:01/other",
        ] {
            assert_eq!(
                send(&state, Method::GET, uri).await.0,
                StatusCode::NOT_FOUND
            );
        }
        let (status, _) = send(&state, Method::POST, "/nodes/52:54:00:00:00:01/plan").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn secrets_are_served_once_per_token() {
        let state = state();
        let token = BootToken::from_bytes(TOKEN).to_hex();
        state
            .tokens()
            .issue(monotonic_now(), KNOWN_MAC, BootToken::from_bytes(TOKEN));
        let secrets_uri = |token: &str| format!("/nodes/52:54:00:00:00:01/secrets?token={token}");
        let (status, body) = send(&state, Method::GET, "/nodes/52:54:00:00:00:01/secrets").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::FORBIDDEN, "no boot token given\n")
        );
        let wrong = BootToken::from_bytes([0x5b; 16]).to_hex();
        for presented in [wrong.as_str(), "nothex", ""] {
            let (status, body) = send(&state, Method::GET, &secrets_uri(presented)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{presented:?}");
            assert_eq!(body, "boot token does not match\n");
        }
        let (status, _) = send(&state, Method::HEAD, &secrets_uri(&token)).await;
        assert_eq!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "HEAD must not spend it"
        );
        let (status, body) = send(&state, Method::GET, &secrets_uri(&token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let secrets: NodeSecrets = serde_json::from_str(&body).unwrap();
        assert_eq!(secrets.secrets["join"].expose(), "s3cret");
        let (status, body) = send(&state, Method::GET, &secrets_uri(&token)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body, "no current boot token for this node\n");
    }

    #[test]
    fn servers_start_with_the_host_header_address_and_name_each_once() {
        let others: Vec<SocketAddr> = vec![
            "10.0.0.1:8080".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:8080".parse().unwrap(),
        ];
        let check = |host: &str, expected: &[&str]| {
            let servers: Vec<String> = boot_servers(host, &others)
                .iter()
                .map(SocketAddr::to_string)
                .collect();
            assert_eq!(servers, expected, "Host: {host}");
        };
        check("10.0.0.2:8080", &["10.0.0.2:8080", "10.0.0.1:8080"]);
        check(
            "10.0.0.3",
            &["10.0.0.3:80", "10.0.0.1:8080", "10.0.0.2:8080"],
        );
        check(
            "[fd00::1]:8080",
            &["[fd00::1]:8080", "10.0.0.1:8080", "10.0.0.2:8080"],
        );
        check(
            "[fd00::1]",
            &["[fd00::1]:80", "10.0.0.1:8080", "10.0.0.2:8080"],
        );
        check("boot.example:8080", &["10.0.0.1:8080", "10.0.0.2:8080"]);
    }
}
