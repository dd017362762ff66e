//! An HTTP/2 client of our own, specialised for gRPC: what [`crate::transport`] runs on.
//!
//! Why: with the `h2` crate a unary put cost at least 41-42.5k client instructions on this
//! project's box (the bare-h2 floor of `benches/unary_floor.rs`), above issue 9's 40k target,
//! and h2's per-frame work was a quarter of a watch response's cost. A client that only
//! speaks what gRPC needs (POST with one header set, DATA, trailers), encodes its frames
//! from the caller's task and hands out DATA payloads as slices of the read buffer does far
//! less.
//!
//! - [`hpack`]: header compression (RFC 7541): a decoder with the dynamic table and Huffman
//!   code, and an encoder that indexes what repeats (no Huffman).
//! - [`frame`]: frames (RFC 9113 §4, §6): reading whole frames out of the receive buffer
//!   without copying payloads, checking each type's layout, writing the client's frames.
//! - [`conn`]: the connection: streams, flow control both ways, the peer's settings, PING,
//!   RST_STREAM, GOAWAY, and the driver that owns the socket.
//!
//! Tested at the frame level by unit tests, and end to end by the whole suite against real
//! etcd servers (3.5.1 and 3.4.23), faults included.

pub(crate) mod conn;
pub(crate) mod fields;
pub(crate) mod frame;
pub(crate) mod hpack;
