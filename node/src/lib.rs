//! bootmesh node library.
