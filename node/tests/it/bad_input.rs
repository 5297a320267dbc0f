//! Placeholder; filled by the bad_input tests.
