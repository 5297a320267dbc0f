//! The web dashboard every server serves at `/dashboard`: a static page (HTML, script and
//! style compiled into the binary, nothing loaded from elsewhere) that polls this server's
//! `/api/v1/cluster` and `/api/v1/nodes` and draws cluster health, the members by rack, how
//! far the nodes' boots have got, and each node's timeline.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::cluster::admin::ClusterStatus;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// The page may load only its own script and style, and talk only to this server.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'";

/// The dashboard's file at `path`, if it is one.
pub fn asset(path: &str) -> Option<Response> {
    let (content_type, body) = match path {
        "/dashboard" | "/dashboard/" => ("text/html; charset=utf-8", INDEX_HTML),
        "/dashboard/app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "/dashboard/style.css" => ("text/css; charset=utf-8", STYLE_CSS),
        _ => return None,
    };
    Some(
        (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, content_type),
                (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
    )
}

/// What `/api/v1/cluster` answers: this server's health and, in a cluster, its view of it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterView {
    /// This server's name (its cluster address, or its host name outside a cluster).
    pub server: String,
    /// Whether `/readyz` would answer ready.
    pub ready: bool,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_because: Option<String>,
    /// The cluster as this member sees it; none outside a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    /// The cluster's catalog: what each group boots, and whether this server follows it yet
    /// (ADR 0014); none outside a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<CatalogView>,
}

/// The cluster's promotions, as `/api/v1/cluster` shows them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CatalogView {
    /// Group by group, the image the cluster promoted.
    pub promotions: Vec<PromotionView>,
    /// Groups whose promoted image this server does not boot yet.
    pub groups_behind_here: u64,
}

/// One group's promotion.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PromotionView {
    /// The group.
    pub group: String,
    /// `name:tag`.
    pub image: String,
    /// The manifest hash, hex (empty if the tag is unknown, which the state machine refuses).
    pub manifest: String,
}

impl CatalogView {
    /// The catalog in `member`'s applied state.
    pub fn of(member: &crate::cluster::member::ClusterMember) -> Self {
        let promotions = member.state.read(|state| {
            state
                .promotions
                .iter()
                .map(|(group, image)| PromotionView {
                    group: group.clone(),
                    image: image.clone(),
                    manifest: state
                        .catalog
                        .get(image)
                        .map(|entry| entry.manifest.clone())
                        .unwrap_or_default(),
                })
                .collect()
        });
        Self {
            promotions,
            groups_behind_here: member.catalog_groups_behind(),
        }
    }
}
