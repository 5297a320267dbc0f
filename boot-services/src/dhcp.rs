//! DHCPv4 server.
