//! The NBD driver: a bounded number of TCP connections, each running one sans-IO
//! [`NbdConnection`]. Reads from the export happen inside the connection (pread on a page-cached
//! image), so a connection is one task with no extra copies.

use std::future::Future;
use std::sync::Arc;

use boot_services::nbd::{NbdConfig, NbdConnection};
use boot_services::source::BlockSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

/// Bytes read from the socket per call.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Serves NBD on `listener` until `shutdown` resolves.
pub async fn run_nbd<S>(
    listener: TcpListener,
    source: S,
    config: NbdConfig,
    connections_max: usize,
    counters: Arc<crate::metrics::SessionCounters>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    S: BlockSource + Clone + Send + Sync + 'static,
    S::Export: Send,
{
    tracing::info!(address = ?listener.local_addr().ok(), "nbd listening");
    let permits = Arc::new(Semaphore::new(connections_max.max(1)));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "nbd accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            counters
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%peer, "nbd connection refused: connections_max reached");
            continue;
        };
        let connection = NbdConnection::new(source.clone(), config);
        let span = tracing::info_span!("nbd", %peer);
        let active = counters.start();
        connections.spawn(
            async move {
                let _permit = permit;
                match serve_connection(stream, connection, active.counters()).await {
                    Ok(export) => tracing::info!(?export, "nbd connection closed"),
                    Err(error) => {
                        active
                            .counters()
                            .failed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(%error, "nbd connection ended");
                    }
                }
            }
            .instrument(span),
        );
    }
    connections.abort_all();
    Ok(())
}

async fn serve_connection<S: BlockSource>(
    mut stream: TcpStream,
    mut connection: NbdConnection<S>,
    counters: &crate::metrics::SessionCounters,
) -> Result<Option<String>, String> {
    stream
        .set_nodelay(true)
        .map_err(|error| error.to_string())?;
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    loop {
        while !connection.pending_output().is_empty() {
            let written = stream
                .write(connection.pending_output())
                .await
                .map_err(|error| error.to_string())?;
            if written == 0 {
                return Err("peer stopped reading".into());
            }
            counters.bytes_sent.fetch_add(
                u64::try_from(written).unwrap_or(u64::MAX),
                std::sync::atomic::Ordering::Relaxed,
            );
            connection.consume_output(written);
        }
        if connection.is_closed() {
            return Ok(connection.export_name().map(str::to_owned));
        }
        if !connection.wants_input() {
            // Output is drained and the core still wants no input: it has nothing left to do.
            return Err("connection stalled".into());
        }
        let read = stream
            .read(&mut buffer)
            .await
            .map_err(|error| error.to_string())?;
        if read == 0 {
            return Ok(connection.export_name().map(str::to_owned));
        }
        connection
            .handle_input(buffer.get(..read).unwrap_or_default())
            .map_err(|error| format!("protocol error: {error}"))?;
    }
}
