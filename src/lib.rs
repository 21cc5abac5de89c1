//! causeway: stretch clustered software across Kubernetes clusters and networks.
//!
//! One binary runs a **site agent** that links to other sites over mutually authenticated
//! QUIC, carries flows through those links and answers `clusterset.local` DNS. The modules
//! are one room per concern; `docs/ARCHITECTURE.md` walks through them.

pub mod admin;
pub mod agent;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod conntable;
pub mod demo;
pub mod dns;
pub mod forward;
pub mod handshake;
pub mod identity;
pub mod intercept;
pub mod link;
pub mod mesh;
pub mod metrics;
pub mod names;
pub mod protocol;
pub mod quic;
pub mod readiness;
pub mod rlimit;
pub mod role;
pub mod routing;
pub mod state;
pub mod token;
pub mod vips;
