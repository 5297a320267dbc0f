//! The run's trace: every protocol event with its virtual time. Its hash identifies a run.

use std::hash::{DefaultHasher, Hasher};
use std::sync::{Arc, Mutex};

/// Shared, append-only trace of a simulated run.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    events: Arc<Mutex<Vec<String>>>,
}

impl Trace {
    /// Appends `event`, stamped with the simulation's virtual time.
    pub fn record(&self, event: impl AsRef<str>) {
        let elapsed = turmoil::sim_elapsed().unwrap_or_default();
        if let Ok(mut events) = self.events.lock() {
            events.push(format!(
                "{:>12.6} {}",
                elapsed.as_secs_f64(),
                event.as_ref()
            ));
        }
    }

    /// Appends `event` from outside the simulated hosts (the harness), stamped with `elapsed`.
    pub fn record_at(&self, elapsed: std::time::Duration, event: impl AsRef<str>) {
        if let Ok(mut events) = self.events.lock() {
            events.push(format!(
                "{:>12.6} {}",
                elapsed.as_secs_f64(),
                event.as_ref()
            ));
        }
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.events.lock().map(|events| events.len()).unwrap_or(0)
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hash of all events in order. `DefaultHasher::new()` has fixed keys, so equal traces
    /// hash equally in every process.
    pub fn hash(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        if let Ok(events) = self.events.lock() {
            for event in events.iter() {
                hasher.write(event.as_bytes());
                hasher.write_u8(0);
            }
        }
        hasher.finish()
    }

    /// All events, for printing a failing run.
    pub fn events(&self) -> Vec<String> {
        self.events
            .lock()
            .map(|events| events.clone())
            .unwrap_or_default()
    }
}
