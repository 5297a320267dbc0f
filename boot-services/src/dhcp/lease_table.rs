//! The server's view of which address belongs to whom: committed bindings, short-lived offer
//! reservations and quarantined addresses, with the allocation policy.
//!
//! Every table is bounded: bindings by the size of the configured ranges plus static hosts,
//! reservations by `offers_max` (oldest evicted first), quarantine by the ranges.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::config::AddressRange;
use super::record::{ClientId, LeaseChange};

/// A committed lease (possibly expired or released: kept for address affinity until reused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Holder.
    pub client: ClientId,
    /// Holder's chaddr.
    pub hardware_address: Vec<u8>,
    /// End of the lease, Unix seconds. Released leases end when released.
    pub expires_at_unix_secs: u64,
    /// Hostname given.
    pub hostname: Option<String>,
}

#[derive(Debug, Clone)]
struct Reservation {
    client: ClientId,
    expires_at_unix_secs: u64,
    /// Insertion order, to evict the oldest under a flood.
    sequence: u64,
}

/// Bindings, reservations and quarantine, indexed both ways.
#[derive(Debug, Default)]
pub struct LeaseTable {
    bindings: BTreeMap<Ipv4Addr, Binding>,
    binding_by_client: BTreeMap<ClientId, Ipv4Addr>,
    /// (expiry, address) of every binding, so the longest-expired address is found first.
    bindings_by_expiry: BTreeSet<(u64, Ipv4Addr)>,
    reservations: BTreeMap<Ipv4Addr, Reservation>,
    reservation_by_client: BTreeMap<ClientId, Ipv4Addr>,
    reservations_by_age: BTreeMap<u64, Ipv4Addr>,
    reservation_sequence: u64,
    quarantine_until: BTreeMap<Ipv4Addr, u64>,
    /// (end of quarantine, address), to return addresses to the pool when it ends.
    quarantine_by_expiry: BTreeSet<(u64, Ipv4Addr)>,
    /// Addresses that the never-used cursor already passed and that are free again: offers
    /// that lapsed or were evicted, quarantines that ended. Allocation takes them before it
    /// reuses an expired lease, and never has to scan a range.
    returned: BTreeSet<Ipv4Addr>,
    /// Per range (by first address): addresses at or beyond this cursor have never been
    /// handed out, so fresh addresses are found without scanning the used part.
    never_used_cursor: BTreeMap<Ipv4Addr, u32>,
    /// Seconds an expired binding still keeps its address from other clients: the clock
    /// drift bound between servers in a cluster (ADR 0007), 0 for a single server.
    reuse_grace_secs: u64,
    /// The simulator's sabotage (feature `sabotage`): count bindings as ended this much before
    /// they end, a bug that gives a held address to a second client. 0 everywhere else.
    reuse_before_expiry_secs: u64,
}

/// Most expired bindings inspected per allocation before giving up; bounds the work a single
/// DISCOVER can cause when many expired addresses are reserved or quarantined.
const REUSE_CANDIDATES_MAX: usize = 256;

impl LeaseTable {
    /// The binding of `address`, if any.
    pub fn binding(&self, address: Ipv4Addr) -> Option<&Binding> {
        self.bindings.get(&address)
    }

    /// The address bound to `client`, expired or not.
    pub fn address_of(&self, client: &ClientId) -> Option<Ipv4Addr> {
        self.binding_by_client.get(client).copied()
    }

    /// The address reserved for `client` by an offer, if still reserved.
    pub fn reservation_of(&self, client: &ClientId, now_unix_secs: u64) -> Option<Ipv4Addr> {
        let address = self.reservation_by_client.get(client)?;
        let reservation = self.reservations.get(address)?;
        (reservation.expires_at_unix_secs > now_unix_secs).then_some(*address)
    }

    /// Addresses reserved by offers that have not ended and that no binding holds yet.
    pub fn reserved_unbound(&self, now_unix_secs: u64) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.reservations
            .iter()
            .filter(move |(address, reservation)| {
                reservation.expires_at_unix_secs > now_unix_secs
                    && !self.bindings.contains_key(address)
            })
            .map(|(address, _)| *address)
    }

    /// Whether an offer's reservation that has not ended holds `address`.
    pub fn is_reserved(&self, address: Ipv4Addr, now_unix_secs: u64) -> bool {
        self.reservations
            .get(&address)
            .is_some_and(|reservation| reservation.expires_at_unix_secs > now_unix_secs)
    }

    /// Number of outstanding reservations (for bounds and metrics).
    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    /// Number of bindings held (active or expired).
    pub fn binding_count(&self) -> usize {
        self.bindings.len()
    }

    /// Every binding as the change that recreates it: a compact snapshot for journals.
    pub fn snapshot(&self) -> Vec<LeaseChange> {
        self.bindings
            .iter()
            .map(|(address, binding)| LeaseChange::Bind {
                client: binding.client.clone(),
                hardware_address: binding.hardware_address.clone(),
                address: *address,
                expires_at_unix_secs: binding.expires_at_unix_secs,
                hostname: binding.hostname.clone(),
            })
            .collect()
    }

    /// All bindings, in address order.
    pub fn bindings(&self) -> impl Iterator<Item = (Ipv4Addr, &Binding)> {
        self.bindings
            .iter()
            .map(|(address, binding)| (*address, binding))
    }

    /// Whether `client` may be given `address` now: not bound to anyone else unexpired,
    /// not reserved for someone else, not quarantined.
    pub fn is_available_to(
        &self,
        address: Ipv4Addr,
        client: &ClientId,
        now_unix_secs: u64,
    ) -> bool {
        if let Some(binding) = self.bindings.get(&address)
            && binding.client != *client
            && binding
                .expires_at_unix_secs
                .saturating_add(self.reuse_grace_secs)
                > now_unix_secs.saturating_add(self.reuse_before_expiry_secs)
        {
            return false;
        }
        if let Some(reservation) = self.reservations.get(&address)
            && reservation.client != *client
            && reservation.expires_at_unix_secs > now_unix_secs
        {
            return false;
        }
        !self.is_quarantined(address, now_unix_secs)
    }

    /// Keeps an expired binding's address from other clients for `grace` more.
    pub fn set_reuse_grace(&mut self, grace_secs: u64) {
        self.reuse_grace_secs = grace_secs;
    }

    /// Switches on a deliberate bug: bindings count as ended `early_secs` before they end.
    /// For the simulator's checker tests only.
    #[cfg(feature = "sabotage")]
    pub fn sabotage_reuse_before_expiry(&mut self, early_secs: u64) {
        self.reuse_before_expiry_secs = early_secs;
    }

    fn is_quarantined(&self, address: Ipv4Addr, now_unix_secs: u64) -> bool {
        self.quarantine_until
            .get(&address)
            .is_some_and(|until| *until > now_unix_secs)
    }

    /// Reserves `address` for `client` until `expires_at_unix_secs`, replacing the client's
    /// previous reservation. When `reservations_max` is reached the oldest reservation goes.
    pub fn reserve(
        &mut self,
        address: Ipv4Addr,
        client: &ClientId,
        expires_at_unix_secs: u64,
        reservations_max: usize,
    ) {
        self.drop_reservation_of(client);
        if let Some(previous) = self.reservations.remove(&address) {
            self.reservation_by_client.remove(&previous.client);
            self.reservations_by_age.remove(&previous.sequence);
        }
        self.returned.remove(&address);
        while self.reservations.len() >= reservations_max.max(1) {
            let Some((_, oldest_address)) = self.reservations_by_age.pop_first() else {
                break;
            };
            if let Some(oldest) = self.reservations.remove(&oldest_address) {
                self.reservation_by_client.remove(&oldest.client);
                self.return_if_unbound(oldest_address);
            }
        }
        self.reservation_sequence += 1;
        let sequence = self.reservation_sequence;
        self.reservations.insert(
            address,
            Reservation {
                client: client.clone(),
                expires_at_unix_secs,
                sequence,
            },
        );
        self.reservation_by_client.insert(client.clone(), address);
        self.reservations_by_age.insert(sequence, address);
    }

    /// Forgets the reservation held by `client`, if any (it chose another server, or its lease
    /// is now committed).
    pub fn drop_reservation_of(&mut self, client: &ClientId) {
        if let Some(address) = self.reservation_by_client.remove(client)
            && let Some(reservation) = self.reservations.remove(&address)
        {
            self.reservations_by_age.remove(&reservation.sequence);
            self.return_if_unbound(address);
        }
    }

    /// An address whose offer ended goes back to the pool unless a lease holds it.
    fn return_if_unbound(&mut self, address: Ipv4Addr) {
        if !self.bindings.contains_key(&address) && !self.quarantine_until.contains_key(&address) {
            self.returned.insert(address);
        }
    }

    /// Drops reservations and quarantines that have ended, returning their addresses to the
    /// pool. Cheap when nothing ended.
    pub fn expire(&mut self, now_unix_secs: u64) {
        // Reservations are created with the same hold time, so age order is expiry order.
        while let Some((&sequence, &address)) = self.reservations_by_age.first_key_value() {
            let expired = self
                .reservations
                .get(&address)
                .is_none_or(|reservation| reservation.expires_at_unix_secs <= now_unix_secs);
            if !expired {
                break;
            }
            self.reservations_by_age.remove(&sequence);
            if let Some(reservation) = self.reservations.remove(&address) {
                self.reservation_by_client.remove(&reservation.client);
                self.return_if_unbound(address);
            }
        }
        while let Some(&(until, address)) = self.quarantine_by_expiry.first() {
            if until > now_unix_secs {
                break;
            }
            self.quarantine_by_expiry.remove(&(until, address));
            if self.quarantine_until.get(&address) == Some(&until) {
                self.quarantine_until.remove(&address);
                self.return_if_unbound(address);
            }
        }
    }

    /// Applies a committed change. Idempotent, so replaying a journal twice is harmless.
    pub fn apply(&mut self, change: &LeaseChange) {
        match change {
            LeaseChange::Bind {
                client,
                hardware_address,
                address,
                expires_at_unix_secs,
                hostname,
            } => {
                self.remove_binding_of_client(client);
                self.remove_binding_at(*address);
                if let Some(until) = self.quarantine_until.remove(address) {
                    self.quarantine_by_expiry.remove(&(until, *address));
                }
                self.returned.remove(address);
                self.bindings.insert(
                    *address,
                    Binding {
                        client: client.clone(),
                        hardware_address: hardware_address.clone(),
                        expires_at_unix_secs: *expires_at_unix_secs,
                        hostname: hostname.clone(),
                    },
                );
                self.binding_by_client.insert(client.clone(), *address);
                self.bindings_by_expiry
                    .insert((*expires_at_unix_secs, *address));
                self.drop_reservation_of(client);
            }
            LeaseChange::Release {
                client,
                address,
                at_unix_secs,
            } => {
                if let Some(binding) = self.bindings.get_mut(address)
                    && binding.client == *client
                    && binding.expires_at_unix_secs > *at_unix_secs
                {
                    self.bindings_by_expiry
                        .remove(&(binding.expires_at_unix_secs, *address));
                    binding.expires_at_unix_secs = *at_unix_secs;
                    self.bindings_by_expiry.insert((*at_unix_secs, *address));
                }
            }
            LeaseChange::Decline {
                address,
                until_unix_secs,
            } => {
                self.remove_binding_at(*address);
                self.returned.remove(address);
                if let Some(previous) = self.quarantine_until.insert(*address, *until_unix_secs) {
                    self.quarantine_by_expiry.remove(&(previous, *address));
                }
                self.quarantine_by_expiry
                    .insert((*until_unix_secs, *address));
            }
        }
    }

    fn remove_binding_of_client(&mut self, client: &ClientId) {
        if let Some(address) = self.binding_by_client.get(client).copied() {
            self.remove_binding_at(address);
        }
    }

    fn remove_binding_at(&mut self, address: Ipv4Addr) {
        if let Some(binding) = self.bindings.remove(&address) {
            self.bindings_by_expiry
                .remove(&(binding.expires_at_unix_secs, address));
            if self.binding_by_client.get(&binding.client) == Some(&address) {
                self.binding_by_client.remove(&binding.client);
            }
        }
    }

    /// Picks a new address for `client` from `ranges`: first one never handed out, else the one
    /// whose lease ended longest ago. `is_excluded` rejects addresses the caller reserves
    /// (static hosts, our own addresses).
    pub fn allocate(
        &mut self,
        ranges: &[AddressRange],
        client: &ClientId,
        now_unix_secs: u64,
        is_excluded: &dyn Fn(Ipv4Addr) -> bool,
    ) -> Option<Ipv4Addr> {
        for range in ranges {
            let first = u32::from(range.first);
            let last = u32::from(range.last);
            if first > last {
                continue;
            }
            let cursor = self.never_used_cursor.entry(range.first).or_insert(first);
            while *cursor <= last {
                let candidate = Ipv4Addr::from(*cursor);
                let untouched = !self.bindings.contains_key(&candidate)
                    && !self.quarantine_until.contains_key(&candidate)
                    && !self.reservations.contains_key(&candidate)
                    && !is_excluded(candidate);
                if untouched {
                    // The cursor stays: the caller reserves the address, and the next call
                    // steps over it. If the offer lapses, the last-resort scan finds it.
                    return Some(candidate);
                }
                match cursor.checked_add(1) {
                    Some(next) => *cursor = next,
                    None => break,
                }
            }
        }
        // Addresses freed after the cursor passed them: lapsed offers, ended quarantines.
        for range in ranges {
            let candidate = self
                .returned
                .range(range.first..=range.last)
                .take(REUSE_CANDIDATES_MAX)
                .copied()
                .find(|address| {
                    !is_excluded(*address) && self.is_available_to(*address, client, now_unix_secs)
                });
            if candidate.is_some() {
                return candidate;
            }
        }
        // Reuse: the binding that expired longest ago, within our ranges.
        let in_ranges = |address: Ipv4Addr| {
            ranges
                .iter()
                .any(|range| range.first <= address && address <= range.last)
        };
        self.bindings_by_expiry
            .iter()
            .take_while(|(expiry, _)| {
                *expiry <= now_unix_secs.saturating_add(self.reuse_before_expiry_secs)
            })
            .take(REUSE_CANDIDATES_MAX)
            .map(|(_, address)| *address)
            .find(|address| {
                in_ranges(*address)
                    && !is_excluded(*address)
                    && self.is_available_to(*address, client, now_unix_secs)
            })
    }
}
