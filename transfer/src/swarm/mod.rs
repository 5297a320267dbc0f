//! The swarm's sans-IO parts (DESIGN 5.3): the messages peers exchange about one image, which
//! chunks each peer holds, and the fetch scheduler that decides what to ask whom. No sockets,
//! clocks or randomness here: a driver feeds events with the time and carries out the actions.

pub mod bitfield;
pub mod scheduler;
pub mod wire;

pub use bitfield::{Bitfield, BitfieldError};
pub use scheduler::{
    ChunkArrival, FetchAction, FetchScheduler, PeerId, SchedulerConfig, SchedulerError,
};
pub use wire::{Message, Priority, WireError};
