//! Content-addressed image chunks, manifests and the peer-to-peer chunk exchange.
//!
//! Not built yet; see the images and swarm issues.
