//! Placeholder; filled by the tftp tests.
