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

//!
//! Still to build (the plan), in `conn.rs`, behind the same `transport::Channel` API so that
//! nothing above the transport changes:
//! - **Shared state** under one mutex: the HPACK encoder (header blocks must go out in the
//!   order they were encoded, so encoding and queuing happen under the same lock), the write
//!   buffer, the stream table (id -> slot: response head, queued DATA `Bytes`, trailers,
//!   error, waker, send window, queued request data), the connection windows, the peer's
//!   settings, GOAWAY state.
//! - **Callers** encode HEADERS (+ DATA when the body fits the windows) straight into the
//!   write buffer and wake the connection task only when the buffer was empty (one wake per
//!   batch of concurrent requests; later, try a non-blocking write from the caller).
//! - **The connection task** owns the socket: it writes the buffer, reads into a `BytesMut`,
//!   takes whole frames out of it ([`frame::read_frame`]) and dispatches them: HPACK-decodes
//!   every header block in order (even for streams gone, to keep the table in step), hands
//!   DATA payloads to their stream as slices, answers SETTINGS and PING, applies
//!   WINDOW_UPDATE (resuming queued request data), fails streams on RST_STREAM, and on
//!   GOAWAY fails the streams above `last_stream` as never sent.
//! - **Flow control**: large receive windows (stream and connection) given back with
//!   WINDOW_UPDATE once half is consumed; request DATA split to the peer's
//!   SETTINGS_MAX_FRAME_SIZE and held back by the stream and connection send windows
//!   (a 1.5 MiB put exceeds gRPC-Go's initial 64 KiB window).
//! - **Streams** end when both sides did (END_STREAM) or on a reset; a caller that drops its
//!   stream early sends RST_STREAM(CANCEL). Stream ids odd and increasing; at 2^31 the
//!   connection is retired and a new one made.
//! - **Keep-alive**: PING while streams are open, as today.
//! - **Tests**: the suite as it is (both etcd versions, faults through the proxy), plus a
//!   frame-level fake peer for GOAWAY, RST_STREAM, window and settings edge cases; then the
//!   callgrind figures of issue 9 again.

// Nothing uses these modules yet (they are being built and tested first).
#![allow(dead_code)]

pub(crate) mod conn;
pub(crate) mod frame;
pub(crate) mod hpack;
