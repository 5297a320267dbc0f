//! DHCP leases through the cluster (DESIGN 4.3): the DHCP service's lease batches are committed
//! through Raft before any ACK leaves, and every lease another server commits reaches this
//! server's lease table, so a client keeps its address whichever server answers it.
//!
//! A batch the leader cannot commit within [`COMMIT_TIMEOUT`] is reported failed: its clients
//! get no ACK and retry. If it commits later after all, the change arrives like any other
//! server's and the client finds its binding on its next try. The state machine refuses a bind
//! of an address another client holds unexpired, whatever any server's table believed.

// A driver: it spawns the task that waits for each batch's commit.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::Duration;

use boot_services::dhcp::{LeaseChange, LeaseProposal, LeaseTable, ProposalId};
use consensus::state::LeaseOutcome;
use consensus::{MeshCommand, MeshResponse};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{Semaphore, broadcast, mpsc};

use super::member::ClusterMember;
use crate::dhcp_service::{DhcpServiceError, LeaseEvent, LeaseStore};

/// How long a batch may wait for its commit (leader failover included) before its clients are
/// left to retry.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches waiting for their commit at once; beyond, new batches fail at once.
const BATCHES_IN_FLIGHT_MAX: usize = 64;
/// Outcomes waiting for the DHCP service.
const EVENTS_BUFFERED: usize = 1024;

/// The cluster as the DHCP service's lease store.
#[derive(Debug)]
pub struct ClusterLeaseStore {
    member: ClusterMember,
    applied: broadcast::Receiver<LeaseChange>,
    sender: mpsc::Sender<LeaseEvent>,
    outcomes: mpsc::Receiver<LeaseEvent>,
    in_flight: Arc<Semaphore>,
}

impl ClusterLeaseStore {
    /// The store of `member`.
    pub fn new(member: ClusterMember) -> Self {
        let applied = member.subscribe_leases();
        let (sender, outcomes) = mpsc::channel(EVENTS_BUFFERED);
        Self {
            member,
            applied,
            sender,
            outcomes,
            in_flight: Arc::new(Semaphore::new(BATCHES_IN_FLIGHT_MAX)),
        }
    }

    fn applied_event(&mut self, received: Result<LeaseChange, RecvError>) -> Option<LeaseEvent> {
        match received {
            Ok(change) => Some(LeaseEvent::Remote(change)),
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "lease changes missed; reloading every lease");
                Some(LeaseEvent::Resync(self.member.lease_changes()))
            }
            Err(RecvError::Closed) => None,
        }
    }
}

/// What the leader's answer to one batch means for each proposal.
fn outcome_events(ids: &[ProposalId], response: MeshResponse) -> Vec<LeaseEvent> {
    let MeshResponse::Leases(outcomes) = response else {
        return vec![LeaseEvent::Failed(
            ids.to_vec(),
            format!("unexpected answer {response:?}"),
        )];
    };
    let mut committed = Vec::new();
    let mut events = Vec::new();
    for (id, outcome) in ids.iter().zip(outcomes) {
        match outcome {
            LeaseOutcome::Committed => committed.push(*id),
            LeaseOutcome::AddressHeld { until_unix_secs } => events.push(LeaseEvent::Refused(
                *id,
                format!("the address is held by another client until {until_unix_secs}"),
            )),
            LeaseOutcome::Malformed(reason) => events.push(LeaseEvent::Refused(*id, reason)),
        }
    }
    events.insert(0, LeaseEvent::Committed(committed));
    events
}

impl LeaseStore for ClusterLeaseStore {
    fn load(&mut self) -> Result<Vec<LeaseChange>, DhcpServiceError> {
        Ok(self.member.lease_changes())
    }

    fn submit(
        &mut self,
        proposals: Vec<LeaseProposal>,
        _table: &LeaseTable,
    ) -> Result<(), DhcpServiceError> {
        let ids: Vec<ProposalId> = proposals.iter().map(|proposal| proposal.id).collect();
        let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            let _ = self.sender.try_send(LeaseEvent::Failed(
                ids,
                "too many lease batches waiting for the cluster".into(),
            ));
            return Ok(());
        };
        let records = proposals
            .iter()
            .map(|proposal| {
                let mut record = Vec::new();
                proposal.change.encode(&mut record);
                record
            })
            .collect();
        let member = self.member.clone();
        let sender = self.sender.clone();
        tokio::spawn(async move {
            let command = MeshCommand::Leases(records);
            let events = match tokio::time::timeout(
                COMMIT_TIMEOUT,
                member.propose_anywhere(command),
            )
            .await
            {
                Ok(Ok(response)) => outcome_events(&ids, response),
                Ok(Err(error)) => vec![LeaseEvent::Failed(ids, error)],
                Err(_) => vec![LeaseEvent::Failed(
                    ids,
                    format!("not committed within {} s", COMMIT_TIMEOUT.as_secs()),
                )],
            };
            for event in events {
                if sender.send(event).await.is_err() {
                    break;
                }
            }
            drop(permit);
        });
        Ok(())
    }

    fn try_event(&mut self) -> Option<LeaseEvent> {
        if let Ok(event) = self.outcomes.try_recv() {
            return Some(event);
        }
        match self.applied.try_recv() {
            Ok(change) => Some(LeaseEvent::Remote(change)),
            Err(TryRecvError::Lagged(missed)) => self.applied_event(Err(RecvError::Lagged(missed))),
            Err(TryRecvError::Empty | TryRecvError::Closed) => None,
        }
    }

    async fn next_event(&mut self) -> Option<LeaseEvent> {
        tokio::select! {
            outcome = self.outcomes.recv() => outcome,
            applied = self.applied.recv() => self.applied_event(applied),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_answer_splits_into_committed_and_refused_proposals() {
        let ids = [ProposalId(1), ProposalId(2), ProposalId(3)];
        let events = outcome_events(
            &ids,
            MeshResponse::Leases(vec![
                LeaseOutcome::Committed,
                LeaseOutcome::AddressHeld { until_unix_secs: 9 },
                LeaseOutcome::Committed,
            ]),
        );
        assert_eq!(
            events[0],
            LeaseEvent::Committed(vec![ProposalId(1), ProposalId(3)])
        );
        assert!(matches!(events[1], LeaseEvent::Refused(ProposalId(2), _)));
        assert!(matches!(
            outcome_events(&ids, MeshResponse::Applied)[0],
            LeaseEvent::Failed(_, _)
        ));
    }
}
