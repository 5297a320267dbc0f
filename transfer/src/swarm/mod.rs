//! The swarm's sans-IO parts (DESIGN 5.3): how peers number an image's chunks, the messages
//! they exchange about it, which chunks each peer holds, the fetch scheduler that decides what
//! to ask whom, the upload gate that decides what to send next, the rule that points a chunk's
//! requesters at the peer it just went to, and the tracker that tells a fetcher whom to peer
//! with. No sockets, clocks or randomness here: a driver feeds events with the time and carries
//! out the actions; `node` drives them over QUIC, the simulator's storm engine in virtual time.

pub mod bitfield;
pub mod claims;
pub mod image;
pub mod scheduler;
pub mod tracker;
pub mod upload;
pub mod wire;

pub use bitfield::{Bitfield, BitfieldError};
pub use claims::{ClaimTimings, HoldBack, SendClaims};
pub use image::{SwarmImage, TooManyChunks};
pub use scheduler::{
    ChunkArrival, FetchAction, FetchScheduler, PeerId, SchedulerConfig, SchedulerError,
    seed_order_key,
};
pub use tracker::{Announce, Tracker, TrackerConfig, TrackerRefusal, tracker_order};
pub use upload::{Admission, Ticket, UploadConfig, UploadEvent, UploadGate};
pub use wire::{
    FIRMWARE_PEERS_MAX, Message, Priority, WireError, data_frame_payload, decode_frame,
};
