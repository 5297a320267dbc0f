//! DHCP against real clients.
