//! Read-only NBD server (fixed newstyle handshake) as a sans-IO state machine.
