//! The TFTP wiring: the listening socket takes read requests, each accepted request becomes a
//! session with its own socket (its transfer id, RFC 1350) and task. Generic over the
//! [`Network`] seam, so the simulator runs it unchanged.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use boot_services::source::FileSource;
use boot_services::tftp::{
    RequestOutcome, SessionOutcome, TftpConfig, TftpSession, handle_request,
};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::seams::{DatagramSocket, Network, monotonic_now};

/// Bigger than any TFTP packet a client may send us (options included).
const REQUEST_BYTES_MAX: usize = 65_536;

/// Serves read requests on `listen` until `shutdown` resolves.
pub async fn run_tftp<N, S>(
    network: N,
    listen: SocketAddr,
    source: S,
    config: TftpConfig,
    counters: Arc<crate::metrics::SessionCounters>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    N: Network,
    S: FileSource + Send + Sync + 'static,
    S::File: Send + 'static,
{
    let socket = network.bind(listen).await?;
    tracing::info!(address = ?socket.local_address().ok(), "tftp listening");
    let source = Arc::new(source);
    let mut sessions = JoinSet::new();
    let mut buffer = vec![0u8; REQUEST_BYTES_MAX];
    tokio::pin!(shutdown);
    loop {
        while sessions.try_join_next().is_some() {}
        let (length, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            received = socket.receive_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(error) => {
                    tracing::warn!(%error, "tftp receive failed");
                    continue;
                }
            },
        };
        while sessions.try_join_next().is_some() {}
        let datagram = buffer.get(..length).unwrap_or_default();
        match handle_request(
            source.as_ref(),
            &config,
            monotonic_now(),
            peer,
            datagram,
            sessions.len(),
        ) {
            RequestOutcome::Session(session) => {
                let span = tracing::info_span!("tftp", %peer, file = %session.filename());
                let network = network.clone();
                let local = SocketAddr::new(listen.ip(), 0);
                let active = counters.start();
                sessions.spawn(run_session(network, local, session, active).instrument(span));
            }
            RequestOutcome::Reply(reply) => {
                counters
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(%peer, "tftp request refused");
                if let Err(error) = socket.send_to(&reply, peer).await {
                    tracing::debug!(%error, %peer, "tftp error reply failed");
                }
            }
            RequestOutcome::Ignore => {
                tracing::debug!(%peer, length, "tftp garbage dropped");
            }
        }
    }
    sessions.abort_all();
    Ok(())
}

async fn run_session<N: Network, F: boot_services::source::ReadAt>(
    network: N,
    local: SocketAddr,
    mut session: TftpSession<F>,
    active: crate::metrics::ActiveSession,
) {
    use std::sync::atomic::Ordering;
    let counters = active.counters();
    let socket = match network.bind(local).await {
        Ok(socket) => socket,
        Err(error) => {
            tracing::warn!(%error, "tftp session socket bind failed");
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let peer = session.peer();
    if let Err(error) = socket.connect(peer).await {
        tracing::warn!(%error, "tftp session socket connect failed");
        counters.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buffer = vec![0u8; REQUEST_BYTES_MAX];
    // One timer for the whole session, re-armed per window: registering a fresh timer for every
    // block costs more than the block itself in lock-step transfers.
    let timer = tokio::time::sleep(std::time::Duration::ZERO);
    tokio::pin!(timer);
    loop {
        while let Some(packet) = session.poll_transmit() {
            if let Err(error) = socket.send(packet).await {
                tracing::debug!(%error, "tftp send failed");
            }
        }
        if let Some(outcome) = session.outcome() {
            match outcome {
                SessionOutcome::Completed { bytes } => {
                    counters.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
                    tracing::info!(?outcome, "tftp transfer done");
                }
                _ => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(?outcome, "tftp transfer ended early");
                }
            }
            return;
        }
        let Some(deadline) = session.poll_timeout() else {
            tracing::warn!("tftp session has neither a timer nor an outcome; ending it");
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let deadline = tokio::time::Instant::from_std(deadline);
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            biased;
            received = socket.receive(&mut buffer) => match received {
                Ok(length) => {
                    session.handle_datagram(monotonic_now(), buffer.get(..length).unwrap_or_default());
                }
                Err(error) => tracing::debug!(%error, "tftp session receive failed"),
            },
            () = &mut timer => {
                session.handle_timeout(monotonic_now());
            }
        }
    }
}
