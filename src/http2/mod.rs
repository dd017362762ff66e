//! An HTTP/2 client of our own, specialised for gRPC (work in progress on this branch; not
//! wired into the transport yet).
//!
//! Why: with the `h2` crate, a unary put costs at least 41-42.5k client instructions on this
//! project's box (the bare-h2 floor of `benches/unary_floor.rs`), above issue 9's 40k target,
//! and h2's per-frame work is a quarter of a watch response's cost. A client that only speaks
//! what gRPC needs (one header set, DATA, trailers), writes from the caller's task and hands
//! out DATA payloads as slices of the read buffer can do far less.
//!
//! Pieces, each tested on its own before the connection is built on them:
//! - [`hpack`]: header compression (RFC 7541).
//! - [`frame`]: frames (RFC 9113 §4, §6): reading whole frames out of the receive buffer
//!   without copying payloads, checking each type's layout, writing the client's frames.

// Nothing uses these modules yet (they are being built and tested first).
#![allow(dead_code)]

pub(crate) mod frame;
pub(crate) mod hpack;
