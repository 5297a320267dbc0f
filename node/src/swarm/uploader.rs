//! The driver of the node's [`UploadGate`]: every request a peer makes waits here for its
//! turn, so the node's upload rate and priorities hold across all its peerings and images.
#![allow(
    clippy::disallowed_methods,
    reason = "the uploader is a driver: it reads the clock and spawns its timer task"
)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use transfer::swarm::{Admission, Priority, Ticket, UploadConfig, UploadEvent, UploadGate};

/// What a waiting request was told.
#[derive(Debug)]
pub enum Turn {
    /// Send now; dropping the permit frees the slot.
    Send(SendPermit),
    /// Answer "busy, ask again after this".
    Busy(Duration),
}

struct State {
    gate: UploadGate,
    next_ticket: Ticket,
    waiting: BTreeMap<Ticket, oneshot::Sender<Turn>>,
    /// Every [`Uploader`] handle is gone: the timer task ends.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Closes the uploader when the last handle goes.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_one();
    }
}

/// The node's upload gate, shared by every peering.
#[derive(Clone)]
pub struct Uploader {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.handle.shared.lock();
        formatter
            .debug_struct("Uploader")
            .field("waiting", &state.gate.waiting())
            .field("sending", &state.gate.sending())
            .finish()
    }
}

/// A slot for one chunk being sent; dropping it frees the slot.
pub struct SendPermit {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for SendPermit {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SendPermit")
    }
}

impl Drop for SendPermit {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.lock().gate.handle_sent();
            shared.changed.notify_one();
        }
    }
}

/// A request that waits; dropping it before its turn takes it out of the queue.
struct Waiting<'a> {
    shared: &'a Shared,
    ticket: Ticket,
    granted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.granted {
            let mut state = self.shared.lock();
            state.waiting.remove(&self.ticket);
            state.gate.handle_cancel(self.ticket);
            drop(state);
            self.shared.changed.notify_one();
        }
    }
}

impl Uploader {
    /// An uploader with `config`; its timer task runs on the current runtime until every
    /// handle is dropped.
    pub fn start(config: UploadConfig) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                gate: UploadGate::new(config),
                next_ticket: 0,
                waiting: BTreeMap::new(),
                closed: false,
            }),
            changed: Notify::new(),
        });
        tokio::spawn(release_turns(Arc::clone(&shared)));
        Self {
            handle: Arc::new(Handle { shared }),
        }
    }

    /// Whether a send now would wait behind others (see `UploadGate::is_busy`).
    pub fn is_busy(&self) -> bool {
        self.handle.shared.lock().gate.is_busy()
    }

    /// Waits for the turn of a request for `bytes` bytes at `priority`.
    pub async fn turn(&self, priority: Priority, bytes: u32) -> Turn {
        let shared = &self.handle.shared;
        let now = tokio::time::Instant::now().into_std();
        let (sender, receiver) = oneshot::channel();
        let ticket = {
            let mut state = shared.lock();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            match state.gate.handle_request(now, ticket, priority, bytes) {
                Admission::Busy { retry_after } => return Turn::Busy(retry_after),
                Admission::Queued => {
                    state.waiting.insert(ticket, sender);
                }
            }
            ticket
        };
        shared.changed.notify_one();
        let mut waiting = Waiting {
            shared,
            ticket,
            granted: false,
        };
        match receiver.await {
            Ok(turn) => {
                waiting.granted = true;
                turn
            }
            // The timer task is gone (the runtime is shutting down): nothing will be sent.
            Err(_) => Turn::Busy(Duration::from_secs(1)),
        }
    }
}

/// Releases turns as the gate allows, until the uploader is closed.
async fn release_turns(shared: Arc<Shared>) {
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let wake_at = {
            let now = tokio::time::Instant::now().into_std();
            let mut state = shared.lock();
            if state.closed {
                return;
            }
            while let Some(event) = state.gate.poll_event(now) {
                let (ticket, turn) = match event {
                    UploadEvent::Send(ticket) => (
                        ticket,
                        Turn::Send(SendPermit {
                            shared: Some(Arc::clone(&shared)),
                        }),
                    ),
                    UploadEvent::Busy {
                        ticket,
                        retry_after,
                    } => (ticket, Turn::Busy(retry_after)),
                };
                if let Some(sender) = state.waiting.remove(&ticket)
                    && let Err(Turn::Send(mut permit)) = sender.send(turn)
                {
                    // The requester went away: free its slot here, under the lock we hold,
                    // rather than in the permit's drop, which would take the lock again.
                    permit.shared = None;
                    state.gate.handle_sent();
                }
            }
            state.gate.poll_timeout()
        };
        match wake_at {
            Some(instant) => {
                tokio::select! {
                    biased;
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(instant)) => {}
                }
            }
            None => notified.await,
        }
    }
}
