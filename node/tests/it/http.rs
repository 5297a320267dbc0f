//! Placeholder; filled by the http tests.
