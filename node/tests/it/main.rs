//! `node`'s integration tests: the real `bootmesh` binary against real clients that nobody
//! here wrote (dhclient, udhcpc, perfdhcp, tftp-hpa, atftp, curl, nbdinfo, nbdcopy, qemu-img),
//! each in network namespaces that the test creates and removes. They need root; CI sets
//! BOOTMESH_NETNS_TESTS=1 so that a missing privilege or program fails instead of skipping.

#![allow(unreachable_pub)] // A test binary has no public API.
#![allow(clippy::disallowed_methods)] // Tests wait on the real clock for real processes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A failed step fails the test, loudly.

mod architecture;
mod bad_input;
mod cluster;
mod deploy;
mod dhcp;
mod dockerfile;
mod docs;
mod http;
mod image_serving;
mod images;
mod initramfs;
mod lab;
mod ltsp_cli;
mod nbd;
mod serve;
mod sim_cli;
mod swarm;
mod tftp;
mod vm;
