//! The deterministic simulator: bootmesh servers run through the production wiring of `node`
//! (`run_dhcp`, `run_tftp`) on turmoil's simulated network, with virtual time, a seeded RNG and
//! simulated storage, against simulated booting nodes. One seed replays a whole run, and the
//! hash of the trace (every DHCP and TFTP message with its virtual time) proves it.
//!
//! What this crate never does: open a real socket, read the real clock, or draw unseeded
//! randomness.

pub mod chaos;
pub mod clients;
pub mod cluster;
pub mod disk;
pub mod plot;
pub mod quic;
pub mod seams;
pub mod storm;
pub mod trace;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use boot_services::dhcp::{AddressRange, DhcpConfig, DhcpServer, Ipv4Network, SubnetConfig};
use boot_services::tftp::TftpConfig;
use node::dhcp_service::{DhcpCounters, run_dhcp};
use node::journal::MemoryLeaseJournal;
use node::tftp_service::run_tftp;

pub use seams::{MemoryFiles, SimClock, SimDhcpLink, TurmoilNetwork};
pub use trace::Trace;

/// What one boot-path run checks and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootRunReport {
    /// Hash of the whole trace.
    pub trace_hash: u64,
    /// Number of trace events.
    pub events: usize,
    /// Address each client was given, by client index.
    pub addresses: Vec<Ipv4Addr>,
}

/// Why a simulated run failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// turmoil reported a failure (a host or client returned an error or panicked).
    #[error("simulation failed: {0}")]
    Turmoil(String),
    /// An invariant did not hold.
    #[error("invariant violated: {0}")]
    Invariant(String),
}

/// The file every simulated node fetches over TFTP.
pub const KERNEL_PATH: &str = "boot/vmlinuz";

/// Deterministic content of the simulated kernel.
pub fn kernel_bytes() -> Vec<u8> {
    (0..100 * 1024u32)
        .map(|index| (index.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// One server and `client_count` nodes: each node obtains a lease by DHCP and downloads the
/// kernel by TFTP. Message latency varies with the seed.
pub fn run_boot_path(seed: u64, client_count: usize) -> Result<BootRunReport, SimError> {
    let trace = Trace::default();
    let mut simulation = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .simulation_duration(Duration::from_secs(120))
        .build();

    let client_names: Vec<String> = (0..client_count)
        .map(|index| format!("node{index}"))
        .collect();
    let server_trace = trace.clone();
    let names_for_server = client_names.clone();
    simulation.host("server", move || {
        let trace = server_trace.clone();
        let client_names = names_for_server.clone();
        async move {
            // The server's address on the simulated boot segment (turmoil hosts have their own
            // addresses; the DHCP core sees this one, as a real server sees its interface's).
            let local_address = Ipv4Addr::new(10, 77, 0, 1);
            let segment: Vec<IpAddr> = client_names
                .iter()
                .map(|name| turmoil::lookup(name.as_str()))
                .collect();
            let config = DhcpConfig {
                subnets: vec![SubnetConfig {
                    network: Ipv4Network {
                        address: Ipv4Addr::new(10, 77, 0, 0),
                        prefix_length: 16,
                    },
                    ranges: vec![AddressRange {
                        first: Ipv4Addr::new(10, 77, 1, 1),
                        last: Ipv4Addr::new(10, 77, 9, 254),
                    }],
                    routers: vec![],
                    dns_servers: vec![],
                    domain_name: None,
                    lease_time: Duration::from_secs(600),
                    next_server: None,
                }],
                ..DhcpConfig::default()
            };
            let server = DhcpServer::new(config).map_err(|error| error.to_string())?;
            let link = Arc::new(SimDhcpLink::bind(local_address, segment, trace.clone()).await?);
            let files = MemoryFiles::new([(KERNEL_PATH.to_owned(), kernel_bytes())]);
            let tftp = run_tftp(
                TurmoilNetwork,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 69)),
                files,
                TftpConfig::default(),
                Arc::default(),
                std::future::pending::<()>(),
            );
            let dhcp = run_dhcp(
                server,
                vec![link],
                MemoryLeaseJournal::default(),
                SimClock,
                1024,
                Arc::new(DhcpCounters::default()),
                std::future::pending::<()>(),
            );
            let (dhcp_result, tftp_result) = tokio::join!(dhcp, tftp);
            dhcp_result.map_err(|error| error.to_string())?;
            tftp_result?;
            Ok(())
        }
    });

    let addresses = Arc::new(std::sync::Mutex::new(vec![
        Ipv4Addr::UNSPECIFIED;
        client_count
    ]));
    for (index, name) in client_names.iter().enumerate() {
        let trace = trace.clone();
        let addresses = Arc::clone(&addresses);
        let client_seed = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(index as u64);
        simulation.client(name.as_str(), async move {
            let server = turmoil::lookup("server");
            let mac = [0x52, 0x54, 0x00, 0x00, (index >> 8) as u8, index as u8];
            let address = clients::obtain_lease(server, mac, client_seed, &trace).await?;
            if let Ok(mut addresses) = addresses.lock()
                && let Some(slot) = addresses.get_mut(index)
            {
                *slot = address;
            }
            let kernel = clients::tftp_download(server, KERNEL_PATH, 1024, &trace).await?;
            if kernel != kernel_bytes() {
                return Err("kernel downloaded over tftp differs from the served file".into());
            }
            trace.record(format!("node{index} booted with {address}"));
            Ok(())
        });
    }

    simulation
        .run()
        .map_err(|error| SimError::Turmoil(error.to_string()))?;
    let addresses = addresses
        .lock()
        .map(|addresses| addresses.clone())
        .unwrap_or_default();
    let mut unique = addresses.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != addresses.len() {
        return Err(SimError::Invariant(format!(
            "two nodes hold one address: {addresses:?}"
        )));
    }
    Ok(BootRunReport {
        trace_hash: trace.hash(),
        events: trace.len(),
        addresses,
    })
}
