//! Which rack a node is in: the rack named by the most specific DHCP subnet that holds its
//! address. A rack behind a DHCP relay is a subnet of its own, so the address a node was given
//! says where it is, whoever it says it is.
//!
//! The fleet configuration changes while servers run (`bootmesh config apply` of a new rack),
//! so the map is one shared handle: the fleet watcher replaces it, and the image tracker and
//! `/api/v1/nodes` read it. A copy taken at start would place every node of a rack added later
//! in no rack at all, and the tracker would stop preferring its rack's peers.

use std::net::Ipv4Addr;
use std::sync::{Arc, PoisonError, RwLock};

use boot_services::dhcp::Ipv4Network;

/// The subnets that name a rack, shared by everything that places nodes.
#[derive(Debug, Clone, Default)]
pub struct RackMap {
    subnets: Arc<RwLock<Vec<(Ipv4Network, String)>>>,
}

impl RackMap {
    /// A map of `subnets` (each with the rack it names).
    pub fn new(subnets: Vec<(Ipv4Network, String)>) -> Self {
        Self {
            subnets: Arc::new(RwLock::new(subnets)),
        }
    }

    /// Replaces the subnets, for every holder of this handle.
    pub fn replace(&self, subnets: Vec<(Ipv4Network, String)>) {
        *self.subnets.write().unwrap_or_else(PoisonError::into_inner) = subnets;
    }

    /// The rack of the most specific subnet that holds `address`, if one names a rack.
    pub fn rack_of(&self, address: Ipv4Addr) -> Option<String> {
        self.subnets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(network, _)| network.contains(address))
            .max_by_key(|(network, _)| network.prefix_length)
            .map(|(_, rack)| rack.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(address: [u8; 4], prefix_length: u8) -> Ipv4Network {
        Ipv4Network {
            address: address.into(),
            prefix_length,
        }
    }

    #[test]
    fn the_most_specific_subnet_names_the_rack() {
        let racks = RackMap::new(vec![
            (network([10, 0, 0, 0], 16), "row".into()),
            (network([10, 0, 2, 0], 24), "r2".into()),
        ]);
        assert_eq!(racks.rack_of([10, 0, 2, 9].into()).as_deref(), Some("r2"));
        assert_eq!(racks.rack_of([10, 0, 3, 9].into()).as_deref(), Some("row"));
        assert_eq!(racks.rack_of([10, 1, 0, 1].into()), None);
    }

    #[test]
    fn a_replaced_map_reaches_every_holder() {
        let racks = RackMap::default();
        let holder = racks.clone();
        assert_eq!(holder.rack_of([10, 98, 2, 100].into()), None);
        racks.replace(vec![(network([10, 98, 2, 0], 24), "r2".into())]);
        assert_eq!(
            holder.rack_of([10, 98, 2, 100].into()).as_deref(),
            Some("r2")
        );
    }
}
