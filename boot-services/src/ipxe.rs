//! iPXE boot scripts.
