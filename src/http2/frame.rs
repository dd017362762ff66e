//! HTTP/2 frames (RFC 9113 §4, §6): the 9-byte header, reading whole frames out of a receive
//! buffer without copying their payloads, checking each type's layout, and writing the frames
//! a client sends.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The client connection preface (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The size of a frame header.
pub(crate) const HEADER_LEN: usize = 9;

/// The default (and smallest allowed) SETTINGS_MAX_FRAME_SIZE.
pub(crate) const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;

/// Frame types (§6).
pub(crate) mod kind {
    pub(crate) const DATA: u8 = 0x0;
    pub(crate) const HEADERS: u8 = 0x1;
    pub(crate) const PRIORITY: u8 = 0x2;
    pub(crate) const RST_STREAM: u8 = 0x3;
    pub(crate) const SETTINGS: u8 = 0x4;
    pub(crate) const PUSH_PROMISE: u8 = 0x5;
    pub(crate) const PING: u8 = 0x6;
    pub(crate) const GOAWAY: u8 = 0x7;
    pub(crate) const WINDOW_UPDATE: u8 = 0x8;
    pub(crate) const CONTINUATION: u8 = 0x9;
}

/// Frame flags (§6).
pub(crate) mod flag {
    pub(crate) const END_STREAM: u8 = 0x1;
    pub(crate) const ACK: u8 = 0x1;
    pub(crate) const END_HEADERS: u8 = 0x4;
    pub(crate) const PADDED: u8 = 0x8;
    pub(crate) const PRIORITY: u8 = 0x20;
}

/// Error codes (§7).
#[allow(dead_code)] // the whole table (§7), not all of it used
pub(crate) mod code {
    pub(crate) const NO_ERROR: u32 = 0x0;
    pub(crate) const PROTOCOL_ERROR: u32 = 0x1;
    pub(crate) const INTERNAL_ERROR: u32 = 0x2;
    pub(crate) const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub(crate) const SETTINGS_TIMEOUT: u32 = 0x4;
    pub(crate) const STREAM_CLOSED: u32 = 0x5;
    pub(crate) const FRAME_SIZE_ERROR: u32 = 0x6;
    pub(crate) const REFUSED_STREAM: u32 = 0x7;
    pub(crate) const CANCEL: u32 = 0x8;
    pub(crate) const COMPRESSION_ERROR: u32 = 0x9;
    pub(crate) const CONNECT_ERROR: u32 = 0xa;
    pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;
    pub(crate) const INADEQUATE_SECURITY: u32 = 0xc;
    pub(crate) const HTTP_1_1_REQUIRED: u32 = 0xd;
}

/// SETTINGS parameters (§6.5.2).
#[allow(dead_code)] // the whole table (§6.5.2), not all of it used
pub(crate) mod setting {
    pub(crate) const HEADER_TABLE_SIZE: u16 = 0x1;
    pub(crate) const ENABLE_PUSH: u16 = 0x2;
    pub(crate) const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub(crate) const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub(crate) const MAX_FRAME_SIZE: u16 = 0x5;
    pub(crate) const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// A connection error: the code to send in GOAWAY, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnError {
    pub(crate) code: u32,
    pub(crate) why: &'static str,
}

fn protocol(why: &'static str) -> ConnError {
    ConnError {
        code: code::PROTOCOL_ERROR,
        why,
    }
}

fn frame_size(why: &'static str) -> ConnError {
    ConnError {
        code: code::FRAME_SIZE_ERROR,
        why,
    }
}

/// A frame as the client handles it. Payloads are slices of the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Data {
        stream: u32,
        end_stream: bool,
        /// The data without padding.
        data: Bytes,
        /// The whole payload length, padding included: what flow control counts.
        flow_len: u32,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        /// The header block fragment, without padding and priority fields.
        block: Bytes,
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        block: Bytes,
    },
    RstStream {
        stream: u32,
        code: u32,
    },
    Settings {
        ack: bool,
        params: Vec<(u16, u32)>,
    },
    Ping {
        ack: bool,
        data: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: u32,
        debug: Bytes,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    /// PRIORITY and unknown frame types: ignored (§5.5, §6.3).
    Ignored,
}

/// Take the next complete frame out of `buf`, if one is there. `max_frame_size` is our
/// SETTINGS_MAX_FRAME_SIZE: a longer frame is a FRAME_SIZE_ERROR.
pub(crate) fn read_frame(
    buf: &mut BytesMut,
    max_frame_size: u32,
) -> Result<Option<Frame>, ConnError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
    let kind = head[3];
    let flags = head[4];
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    if len > max_frame_size {
        return Err(frame_size("frame longer than our SETTINGS_MAX_FRAME_SIZE"));
    }
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(HEADER_LEN);
    let payload = frame.freeze();
    parse(kind, flags, stream, payload).map(Some)
}

/// Strip the padding of a PADDED frame: (the rest, the padding length counted).
fn unpad(flags: u8, mut payload: Bytes) -> Result<Bytes, ConnError> {
    if flags & flag::PADDED == 0 {
        return Ok(payload);
    }
    let Some(&pad) = payload.first() else {
        return Err(frame_size("padded frame without a pad length"));
    };
    payload.advance(1);
    let pad = usize::from(pad);
    if pad > payload.len() {
        return Err(protocol("padding longer than the payload"));
    }
    payload.truncate(payload.len() - pad);
    Ok(payload)
}

fn parse(kind: u8, flags: u8, stream: u32, payload: Bytes) -> Result<Frame, ConnError> {
    let len = payload.len();
    match kind {
        kind::DATA => {
            if stream == 0 {
                return Err(protocol("DATA on stream 0"));
            }
            let flow_len = len as u32;
            Ok(Frame::Data {
                stream,
                end_stream: flags & flag::END_STREAM != 0,
                data: unpad(flags, payload)?,
                flow_len,
            })
        }
        kind::HEADERS => {
            if stream == 0 {
                return Err(protocol("HEADERS on stream 0"));
            }
            let mut block = unpad(flags, payload)?;
            if flags & flag::PRIORITY != 0 {
                if block.len() < 5 {
                    return Err(frame_size("HEADERS too short for its priority fields"));
                }
                block.advance(5);
            }
            Ok(Frame::Headers {
                stream,
                end_stream: flags & flag::END_STREAM != 0,
                end_headers: flags & flag::END_HEADERS != 0,
                block,
            })
        }
        kind::CONTINUATION => {
            if stream == 0 {
                return Err(protocol("CONTINUATION on stream 0"));
            }
            Ok(Frame::Continuation {
                stream,
                end_headers: flags & flag::END_HEADERS != 0,
                block: payload,
            })
        }
        kind::PRIORITY => {
            if stream == 0 {
                return Err(protocol("PRIORITY on stream 0"));
            }
            if len != 5 {
                return Err(frame_size("PRIORITY of the wrong length"));
            }
            Ok(Frame::Ignored)
        }
        kind::RST_STREAM => {
            if stream == 0 {
                return Err(protocol("RST_STREAM on stream 0"));
            }
            let Some(&c) = payload.first_chunk::<4>() else {
                return Err(frame_size("RST_STREAM of the wrong length"));
            };
            if len != 4 {
                return Err(frame_size("RST_STREAM of the wrong length"));
            }
            Ok(Frame::RstStream {
                stream,
                code: u32::from_be_bytes(c),
            })
        }
        kind::SETTINGS => {
            if stream != 0 {
                return Err(protocol("SETTINGS on a stream"));
            }
            let ack = flags & flag::ACK != 0;
            if ack && len != 0 {
                return Err(frame_size("SETTINGS ack with a payload"));
            }
            if !len.is_multiple_of(6) {
                return Err(frame_size("SETTINGS length not a multiple of 6"));
            }
            let params = payload
                .chunks_exact(6)
                .map(|p| {
                    (
                        u16::from_be_bytes([p[0], p[1]]),
                        u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                    )
                })
                .collect();
            Ok(Frame::Settings { ack, params })
        }
        kind::PUSH_PROMISE => Err(protocol("PUSH_PROMISE although push is disabled")),
        kind::PING => {
            if stream != 0 {
                return Err(protocol("PING on a stream"));
            }
            let Some(&data) = payload.first_chunk::<8>() else {
                return Err(frame_size("PING of the wrong length"));
            };
            if len != 8 {
                return Err(frame_size("PING of the wrong length"));
            }
            Ok(Frame::Ping {
                ack: flags & flag::ACK != 0,
                data,
            })
        }
        kind::GOAWAY => {
            if stream != 0 {
                return Err(protocol("GOAWAY on a stream"));
            }
            let Some(&head) = payload.first_chunk::<8>() else {
                return Err(frame_size("GOAWAY too short"));
            };
            let mut debug = payload;
            debug.advance(8);
            Ok(Frame::GoAway {
                last_stream: u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff,
                code: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
                debug,
            })
        }
        kind::WINDOW_UPDATE => {
            let Some(&inc) = payload.first_chunk::<4>() else {
                return Err(frame_size("WINDOW_UPDATE of the wrong length"));
            };
            if len != 4 {
                return Err(frame_size("WINDOW_UPDATE of the wrong length"));
            }
            // A zero increment is a stream error on a stream (the caller resets it) and a
            // connection error on the connection (§6.9).
            let increment = u32::from_be_bytes(inc) & 0x7fff_ffff;
            if increment == 0 && stream == 0 {
                return Err(protocol("WINDOW_UPDATE of 0 on the connection"));
            }
            Ok(Frame::WindowUpdate { stream, increment })
        }
        _ => Ok(Frame::Ignored),
    }
}

/// Append a frame header (in one copy: `BytesMut`'s writes are calls, not inlined).
fn put_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = len as u32;
    let id = (stream & 0x7fff_ffff).to_be_bytes();
    out.put_slice(&[
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        kind,
        flags,
        id[0],
        id[1],
        id[2],
        id[3],
    ]);
}

/// Append a HEADERS frame carrying `block`, split into CONTINUATION frames when it is longer
/// than `max_frame_size` (the peer's).
pub(crate) fn write_headers(
    out: &mut BytesMut,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame_size: u32,
) {
    let max = max_frame_size as usize;
    let mut chunks = block.chunks(max.max(1)).peekable();
    let first = chunks.next().unwrap_or(&[]);
    let mut flags = if end_stream { flag::END_STREAM } else { 0 };
    if chunks.peek().is_none() {
        flags |= flag::END_HEADERS;
    }
    put_header(out, first.len(), kind::HEADERS, flags, stream);
    out.put_slice(first);
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            flag::END_HEADERS
        } else {
            0
        };
        put_header(out, chunk.len(), kind::CONTINUATION, flags, stream);
        out.put_slice(chunk);
    }
}

/// Append the header of a DATA frame of `len` bytes (the payload follows it, copied or sent
/// as its own buffer).
pub(crate) fn write_data_header(out: &mut BytesMut, stream: u32, len: usize, end_stream: bool) {
    let flags = if end_stream { flag::END_STREAM } else { 0 };
    put_header(out, len, kind::DATA, flags, stream);
}

/// Append a SETTINGS frame with `params`.
pub(crate) fn write_settings(out: &mut BytesMut, params: &[(u16, u32)]) {
    put_header(out, params.len() * 6, kind::SETTINGS, 0, 0);
    for &(id, value) in params {
        out.put_u16(id);
        out.put_u32(value);
    }
}

/// Append the acknowledgement of the peer's SETTINGS.
pub(crate) fn write_settings_ack(out: &mut BytesMut) {
    put_header(out, 0, kind::SETTINGS, flag::ACK, 0);
}

/// Append a PING (or its answer, with `ack`).
pub(crate) fn write_ping(out: &mut BytesMut, data: [u8; 8], ack: bool) {
    put_header(out, 8, kind::PING, if ack { flag::ACK } else { 0 }, 0);
    out.put_slice(&data);
}

/// Append a WINDOW_UPDATE for `stream` (0: the connection).
pub(crate) fn write_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_header(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.put_u32(increment & 0x7fff_ffff);
}

/// Append an RST_STREAM.
pub(crate) fn write_rst_stream(out: &mut BytesMut, stream: u32, code: u32) {
    put_header(out, 4, kind::RST_STREAM, 0, stream);
    out.put_u32(code);
}

/// Append a GOAWAY.
pub(crate) fn write_goaway(out: &mut BytesMut, last_stream: u32, code: u32, debug: &[u8]) {
    put_header(out, 8 + debug.len(), kind::GOAWAY, 0, 0);
    out.put_u32(last_stream & 0x7fff_ffff);
    out.put_u32(code);
    out.put_slice(debug);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> Vec<Result<Frame, ConnError>> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match read_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE) {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn written_frames_read_back() {
        let mut out = BytesMut::new();
        write_settings(
            &mut out,
            &[
                (setting::ENABLE_PUSH, 0),
                (setting::INITIAL_WINDOW_SIZE, 1 << 21),
            ],
        );
        write_settings_ack(&mut out);
        write_ping(&mut out, *b"12345678", false);
        write_ping(&mut out, *b"abcdefgh", true);
        write_window_update(&mut out, 0, 1 << 20);
        write_window_update(&mut out, 3, 77);
        write_rst_stream(&mut out, 5, code::CANCEL);
        write_goaway(&mut out, 7, code::ENHANCE_YOUR_CALM, b"too_many_pings");
        write_data_header(&mut out, 1, 3, true);
        out.put_slice(b"abc");
        write_headers(&mut out, 1, b"hdrs", false, DEFAULT_MAX_FRAME_SIZE);
        let frames: Vec<Frame> = read_all(&out).into_iter().map(Result::unwrap).collect();
        assert_eq!(
            frames,
            vec![
                Frame::Settings {
                    ack: false,
                    params: vec![
                        (setting::ENABLE_PUSH, 0),
                        (setting::INITIAL_WINDOW_SIZE, 1 << 21)
                    ]
                },
                Frame::Settings {
                    ack: true,
                    params: vec![]
                },
                Frame::Ping {
                    ack: false,
                    data: *b"12345678"
                },
                Frame::Ping {
                    ack: true,
                    data: *b"abcdefgh"
                },
                Frame::WindowUpdate {
                    stream: 0,
                    increment: 1 << 20
                },
                Frame::WindowUpdate {
                    stream: 3,
                    increment: 77
                },
                Frame::RstStream {
                    stream: 5,
                    code: code::CANCEL
                },
                Frame::GoAway {
                    last_stream: 7,
                    code: code::ENHANCE_YOUR_CALM,
                    debug: Bytes::from_static(b"too_many_pings")
                },
                Frame::Data {
                    stream: 1,
                    end_stream: true,
                    data: Bytes::from_static(b"abc"),
                    flow_len: 3
                },
                Frame::Headers {
                    stream: 1,
                    end_stream: false,
                    end_headers: true,
                    block: Bytes::from_static(b"hdrs")
                },
            ]
        );
    }

    #[test]
    fn long_header_blocks_continue_and_frames_wait_for_their_bytes() {
        let block: Vec<u8> = (0..40u8).collect();
        let mut out = BytesMut::new();
        write_headers(&mut out, 9, &block, true, 16);
        let frames: Vec<Frame> = read_all(&out).into_iter().map(Result::unwrap).collect();
        assert_eq!(frames.len(), 3);
        let mut joined = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            match f {
                Frame::Headers {
                    stream: 9,
                    end_stream: true,
                    end_headers: false,
                    block,
                } if i == 0 => joined.extend_from_slice(block),
                Frame::Continuation {
                    stream: 9,
                    end_headers,
                    block,
                } if i > 0 => {
                    assert_eq!(*end_headers, i == 2);
                    joined.extend_from_slice(block)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(joined, block);
        // Byte by byte: nothing until a frame is whole, nothing lost.
        let mut buf = BytesMut::new();
        let mut got = 0;
        for &b in out.iter() {
            buf.put_u8(b);
            while let Some(_f) = read_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap() {
                got += 1;
            }
        }
        assert_eq!(got, 3);
        assert!(buf.is_empty());
    }

    #[test]
    fn padding_and_priority_are_stripped_and_flow_counts_all() {
        // DATA, PADDED: pad length 2, "hi", two padding bytes.
        let mut out = BytesMut::new();
        put_header(&mut out, 5, kind::DATA, flag::PADDED, 3);
        out.put_slice(&[2, b'h', b'i', 0, 0]);
        // HEADERS, PADDED | PRIORITY: pad 1, 5 priority bytes, block "x", 1 padding byte.
        put_header(
            &mut out,
            8,
            kind::HEADERS,
            flag::PADDED | flag::PRIORITY | flag::END_HEADERS,
            3,
        );
        out.put_slice(&[1, 0, 0, 0, 1, 16, b'x', 0]);
        let frames: Vec<Frame> = read_all(&out).into_iter().map(Result::unwrap).collect();
        assert_eq!(
            frames,
            vec![
                Frame::Data {
                    stream: 3,
                    end_stream: false,
                    data: Bytes::from_static(b"hi"),
                    flow_len: 5
                },
                Frame::Headers {
                    stream: 3,
                    end_stream: false,
                    end_headers: true,
                    block: Bytes::from_static(b"x")
                },
            ]
        );
    }

    #[test]
    fn malformed_frames_are_connection_errors() {
        let bad = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
            let mut out = BytesMut::new();
            put_header(&mut out, payload.len(), kind, flags, stream);
            out.put_slice(payload);
            match read_all(&out).pop() {
                Some(Err(e)) => e.code,
                other => panic!("{kind} {flags} {stream} {payload:?}: {other:?}"),
            }
        };
        assert_eq!(bad(kind::DATA, 0, 0, b"x"), code::PROTOCOL_ERROR);
        assert_eq!(
            bad(kind::DATA, flag::PADDED, 1, &[5, 1]),
            code::PROTOCOL_ERROR
        );
        assert_eq!(
            bad(kind::DATA, flag::PADDED, 1, &[]),
            code::FRAME_SIZE_ERROR
        );
        assert_eq!(bad(kind::HEADERS, 0, 0, b"x"), code::PROTOCOL_ERROR);
        assert_eq!(
            bad(kind::HEADERS, flag::PRIORITY, 1, &[0, 0]),
            code::FRAME_SIZE_ERROR
        );
        assert_eq!(bad(kind::SETTINGS, 0, 1, &[]), code::PROTOCOL_ERROR);
        assert_eq!(
            bad(kind::SETTINGS, flag::ACK, 0, &[0; 6]),
            code::FRAME_SIZE_ERROR
        );
        assert_eq!(bad(kind::SETTINGS, 0, 0, &[0; 5]), code::FRAME_SIZE_ERROR);
        assert_eq!(bad(kind::PING, 0, 0, &[0; 7]), code::FRAME_SIZE_ERROR);
        assert_eq!(bad(kind::PING, 0, 1, &[0; 8]), code::PROTOCOL_ERROR);
        assert_eq!(bad(kind::GOAWAY, 0, 0, &[0; 7]), code::FRAME_SIZE_ERROR);
        assert_eq!(
            bad(kind::WINDOW_UPDATE, 0, 0, &[0; 4]),
            code::PROTOCOL_ERROR
        );
        assert_eq!(
            bad(kind::WINDOW_UPDATE, 0, 1, &[0; 3]),
            code::FRAME_SIZE_ERROR
        );
        assert_eq!(bad(kind::RST_STREAM, 0, 0, &[0; 4]), code::PROTOCOL_ERROR);
        assert_eq!(bad(kind::RST_STREAM, 0, 1, &[0; 5]), code::FRAME_SIZE_ERROR);
        assert_eq!(bad(kind::PRIORITY, 0, 1, &[0; 4]), code::FRAME_SIZE_ERROR);
        assert_eq!(bad(kind::PUSH_PROMISE, 0, 1, &[0; 4]), code::PROTOCOL_ERROR);
        // A zero WINDOW_UPDATE on a stream is the stream's error, passed up.
        let mut out = BytesMut::new();
        write_window_update(&mut out, 3, 0);
        assert_eq!(
            read_all(&out),
            vec![Ok(Frame::WindowUpdate {
                stream: 3,
                increment: 0
            })]
        );
        // Too long for our limit.
        let mut out = BytesMut::new();
        put_header(&mut out, 16_385, kind::DATA, 0, 1);
        assert_eq!(
            read_frame(&mut out, DEFAULT_MAX_FRAME_SIZE)
                .unwrap_err()
                .code,
            code::FRAME_SIZE_ERROR
        );
        // Unknown types are ignored.
        let mut out = BytesMut::new();
        put_header(&mut out, 2, 0xfa, 0xff, 0);
        out.put_slice(b"zz");
        assert_eq!(read_all(&out), vec![Ok(Frame::Ignored)]);
    }
}
