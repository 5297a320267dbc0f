//! Placeholder; filled by the nbd tests.
