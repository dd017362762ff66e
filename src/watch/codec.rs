//! Decoding of the Watch stream's responses.
//!
//! Same result as prost; the difference is speed, decoding being the largest client cost of a
//! watch response. Each message arrives as one `Bytes` (sliced out of the received frame by
//! `grpc::MessageStream`) and is read by a decoder written for the watch messages (keys and
//! values are slices of the received bytes, as with prost); anything it does not expect goes
//! to prost.

use bytes::Bytes;
use prost::Message;
use tonic::Status;

use super::{Event, EventKind, Events};
use crate::proto::etcdserverpb as pb;
use crate::proto::mvccpb;
use crate::types::KeyValue;

/// A WatchResponse as the multiplexer uses it: prost's message, with the events already in
/// their final form (one event inline, so most responses allocate nothing).
#[derive(Debug, Default, PartialEq)]
pub(super) struct Response {
    pub(super) header: pb::ResponseHeader,
    pub(super) watch_id: i64,
    pub(super) created: bool,
    pub(super) canceled: bool,
    pub(super) compact_revision: i64,
    pub(super) cancel_reason: String,
    pub(super) fragment: bool,
    pub(super) events: Events,
}

impl Response {
    fn from_pb(r: pb::WatchResponse) -> Self {
        Response {
            header: r.header.unwrap_or_default(),
            watch_id: r.watch_id,
            created: r.created,
            canceled: r.canceled,
            compact_revision: r.compact_revision,
            cancel_reason: r.cancel_reason,
            fragment: r.fragment,
            events: Events::from_pb(r.events),
        }
    }
}

/// The path of the Watch RPC.
pub(super) const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";

/// Decode one WatchResponse (the gRPC prefix already removed) into `into`: the fast path
/// below, or prost for anything it does not handle (or a malformed message, so errors are
/// prost's). `into` is a fresh or reused response: with its event inline it is a few hundred
/// bytes, and moving it through the stream's layers by value cost more than decoding it.
pub(super) fn decode_into(
    bytes: Bytes,
    into: &mut Response,
    memo: &mut HeaderMemo,
) -> Result<(), Status> {
    if decode_response(&bytes, into, memo).is_some() {
        return Ok(());
    }
    let m = pb::WatchResponse::decode(bytes).map_err(|e| Status::internal(e.to_string()))?;
    *into = Response::from_pb(m);
    Ok(())
}

/// The watch stream's messages, undecoded: the multiplexer decodes each in place.
pub(super) fn raw(bytes: Bytes) -> Result<Bytes, Status> {
    Ok(bytes)
}

// ---- the fast path ----
//
// A decoder for exactly the messages of a watch response, reading a contiguous buffer with
// plain indexing: prost's generic decoding costs several times more per field. It gives the
// same result as prost for every message it accepts (the tests compare them); on anything
// unusual (a group, a known field with an unexpected wire type, a string that is not UTF-8,
// a truncated or overlong varint) it gives up and prost decodes the message instead, so
// errors are prost's. Unknown fields are skipped, as prost does.

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// The low 7 bits of each of the 8 bytes of `word` (little-endian), packed into 56 bits.
#[inline]
fn pack7(word: u64) -> u64 {
    let w = word & 0x7f7f_7f7f_7f7f_7f7f;
    let w = (w & 0x007f_007f_007f_007f) | ((w & 0x7f00_7f00_7f00_7f00) >> 1);
    let w = (w & 0x0000_3fff_0000_3fff) | ((w & 0x3fff_0000_3fff_0000) >> 2);
    (w & 0x0000_0000_0fff_ffff) | ((w & 0x0fff_ffff_0000_0000) >> 4)
}

/// A varint of more than one byte at the start of `rest` (ids, revisions, lengths above 127):
/// its value and length. Two bytes are read as such; longer ones, with 8 bytes at hand, as one
/// word: the first byte without the continuation bit ends the varint, and the 7-bit groups are
/// packed with three shift-and-mask steps instead of a loop per byte (cluster and member ids
/// take all 10 bytes, revisions 2-4).
#[inline]
fn long_varint(rest: &[u8]) -> Option<(u64, usize)> {
    // Two bytes (lengths up to 16 KiB, revisions up to 16k) are the most common case and
    // cheapest byte by byte.
    if let [b0, b1, ..] = rest
        && *b1 < 0x80
    {
        return Some((u64::from(b0 & 0x7f) | (u64::from(*b1) << 7), 2));
    }
    let Some(&first8) = rest.first_chunk::<8>() else {
        return short_tail_varint(rest);
    };
    let word = u64::from_le_bytes(first8);
    let stops = !word & 0x8080_8080_8080_8080;
    if stops != 0 {
        // Ends within these 8 bytes: its length is the first stop byte's index + 1.
        let len = (stops.trailing_zeros() / 8 + 1) as usize;
        let kept = if len == 8 {
            word
        } else {
            word & ((1u64 << (len * 8)) - 1)
        };
        return Some((pack7(kept), len));
    }
    // 9 or 10 bytes: the first 8 carry 56 bits, the 10th only the top bit.
    let low = pack7(word);
    let b8 = *rest.get(8)?;
    if b8 < 0x80 {
        return Some((low | (u64::from(b8) << 56), 9));
    }
    let b9 = *rest.get(9)?;
    if b9 > 1 {
        return None; // more than 64 bits
    }
    Some((
        low | (u64::from(b8 & 0x7f) << 56) | (u64::from(b9) << 63),
        10,
    ))
}

/// [`long_varint`] near the end of the buffer: byte by byte.
fn short_tail_varint(rest: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in rest.iter().take(10).enumerate() {
        if i == 9 && b > 1 {
            return None; // more than 64 bits
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some((value, i + 1));
        }
    }
    None
}

/// A cursor over `data[pos..end]`; `data` is `buf`'s contents.
struct Reader<'a> {
    buf: &'a Bytes,
    data: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a Bytes) -> Self {
        Reader {
            buf,
            data: buf.as_ref(),
            pos: 0,
            end: buf.len(),
        }
    }

    #[inline]
    fn more(&self) -> bool {
        self.pos < self.end
    }

    #[inline]
    fn varint(&mut self) -> Option<u64> {
        // Tags, lengths and most values are one byte.
        if self.pos < self.end
            && let Some(&b) = self.data.get(self.pos)
            && b < 0x80
        {
            self.pos += 1;
            return Some(u64::from(b));
        }
        self.long_varint()
    }

    /// A varint of more than one byte (see [`long_varint`]).
    #[inline(never)]
    fn long_varint(&mut self) -> Option<u64> {
        let (v, len) = long_varint(self.data.get(self.pos..self.end)?)?;
        self.pos += len;
        Some(v)
    }

    /// The next key: (field number, wire type).
    #[inline]
    fn key(&mut self) -> Option<(u64, u64)> {
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 || key > u64::from(u32::MAX) {
            return None;
        }
        Some((field, key & 7))
    }

    /// The bounds of a length-delimited field's payload; the cursor moves past it.
    #[inline]
    fn len_delimited(&mut self) -> Option<(usize, usize)> {
        let len = usize::try_from(self.varint()?).ok()?;
        let start = self.pos;
        let end = start.checked_add(len)?;
        if end > self.end {
            return None;
        }
        self.pos = end;
        Some((start, end))
    }

    /// A reader over the payload of a length-delimited field.
    #[inline]
    fn sub(&mut self) -> Option<Reader<'a>> {
        let (pos, end) = self.len_delimited()?;
        Some(Reader {
            buf: self.buf,
            data: self.data,
            pos,
            end,
        })
    }

    fn bytes(&mut self) -> Option<Bytes> {
        let (start, end) = self.len_delimited()?;
        Some(self.buf.slice(start..end))
    }

    /// Skip a field of an unknown number.
    fn skip(&mut self, wire_type: u64) -> Option<()> {
        let n = match wire_type {
            VARINT => return self.varint().map(|_| ()),
            LEN => return self.len_delimited().map(|_| ()),
            FIXED64 => 8,
            FIXED32 => 4,
            _ => return None, // groups: never sent by etcd; prost handles them
        };
        let end = self.pos.checked_add(n)?;
        if end > self.end {
            return None;
        }
        self.pos = end;
        Some(())
    }

    /// A varint field's value, when the wire type is right.
    #[inline]
    fn int(&mut self, wire_type: u64) -> Option<u64> {
        if wire_type != VARINT {
            return None;
        }
        self.varint()
    }

    /// A length-delimited field's payload, when the wire type is right.
    #[inline]
    fn message(&mut self, wire_type: u64) -> Option<Reader<'a>> {
        if wire_type != LEN {
            return None;
        }
        self.sub()
    }
}

// The casts below are protobuf's: int64 and enum values are varints reinterpreted.
#[allow(clippy::cast_possible_wrap, clippy::cast_possible_truncation)]
fn decode_response(buf: &Bytes, m: &mut Response, memo: &mut HeaderMemo) -> Option<()> {
    reset(m);
    if decode_in_order(buf, m, memo).is_some() {
        return Some(());
    }
    reset(m);
    let mut r = Reader::new(buf);
    while r.more() {
        let (field, wt) = r.key()?;
        match field {
            1 => merge_header(&mut m.header, r.message(wt)?)?,
            2 => m.watch_id = r.int(wt)? as i64,
            3 => m.created = r.int(wt)? != 0,
            4 => m.canceled = r.int(wt)? != 0,
            5 => m.compact_revision = r.int(wt)? as i64,
            6 => {
                let (start, end) = r.message(wt).map(|s| (s.pos, s.end))?;
                m.cancel_reason.clear();
                m.cancel_reason
                    .push_str(std::str::from_utf8(r.data.get(start..end)?).ok()?);
            }
            7 => m.fragment = r.int(wt)? != 0,
            11 => {
                let sub = r.message(wt)?;
                merge_event(m.events.push_empty()?, sub)?;
            }
            _ => r.skip(wt)?,
        }
    }
    Some(())
}

/// Clear a response for the next message.
fn reset(m: &mut Response) {
    m.header = pb::ResponseHeader::default();
    m.watch_id = 0;
    m.created = false;
    m.canceled = false;
    m.compact_revision = 0;
    m.cancel_reason.clear();
    m.fragment = false;
    if !m.events.is_empty() {
        m.events = Events::default();
    }
}

// ---- the straight path ----
//
// etcd (like prost) writes fields in field-number order, each at most once, and omits zero
// values. For that layout the decoder need not loop over tags: it checks for each field's
// one-byte key in turn, and reads a message in a single pass. Anything else (a field out of
// order or repeated, an unknown field, a wrong wire type, a non-UTF-8 reason) makes it give up,
// and the loop above decodes the message instead.

/// A cursor over a message's remaining bytes (a part of `buf`).
struct Cursor<'a> {
    buf: &'a Bytes,
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Move past the one-byte key `key` when it comes next.
    #[inline(always)]
    fn eat(&mut self, key: u8) -> bool {
        if let [k, tail @ ..] = self.rest
            && *k == key
        {
            self.rest = tail;
            return true;
        }
        false
    }

    #[inline(always)]
    fn varint(&mut self) -> Option<u64> {
        if let [b, tail @ ..] = self.rest
            && *b < 0x80
        {
            self.rest = tail;
            return Some(u64::from(*b));
        }
        self.long_varint()
    }

    #[inline(never)]
    fn long_varint(&mut self) -> Option<u64> {
        let (v, len) = long_varint(self.rest)?;
        self.rest = self.rest.get(len..)?;
        Some(v)
    }

    /// A cursor over the next length-delimited payload; this one moves past it.
    #[inline(always)]
    fn sub(&mut self) -> Option<Cursor<'a>> {
        let len = usize::try_from(self.varint()?).ok()?;
        if len > self.rest.len() {
            return None;
        }
        let (payload, tail) = self.rest.split_at(len);
        self.rest = tail;
        Some(Cursor {
            buf: self.buf,
            rest: payload,
        })
    }

    /// The next length-delimited payload, as a slice of the received bytes.
    #[inline(always)]
    fn bytes(&mut self) -> Option<Bytes> {
        let sub = self.sub()?;
        Some(self.buf.slice_ref(sub.rest))
    }

    fn done(&self) -> Option<()> {
        self.rest.is_empty().then_some(())
    }
}

/// The last response header decoded, with its bytes. The responses of a burst carry the same
/// header (the cluster and member ids take ten bytes each), so most are copied instead of
/// decoded.
pub(super) struct HeaderMemo {
    raw: [u8; 48],
    len: usize,
    header: pb::ResponseHeader,
}

impl Default for HeaderMemo {
    fn default() -> Self {
        HeaderMemo {
            raw: [0; 48],
            len: 0,
            header: pb::ResponseHeader::default(),
        }
    }
}

impl HeaderMemo {
    #[inline]
    fn get(&self, raw: &[u8]) -> Option<pb::ResponseHeader> {
        (self.len != 0 && self.raw.get(..self.len) == Some(raw)).then_some(self.header)
    }

    #[inline]
    fn put(&mut self, raw: &[u8], header: pb::ResponseHeader) {
        if let Some(slot) = self.raw.get_mut(..raw.len())
            && !raw.is_empty()
        {
            slot.copy_from_slice(raw);
            self.len = raw.len();
            self.header = header;
        }
    }
}

/// Decode `buf` into a cleared `m` when its fields come in order; `None` otherwise (`m` is
/// then left half-written).
#[allow(clippy::cast_possible_wrap, clippy::cast_possible_truncation)]
fn decode_in_order(buf: &Bytes, m: &mut Response, memo: &mut HeaderMemo) -> Option<()> {
    let mut c = Cursor {
        buf,
        rest: buf.as_ref(),
    };
    if c.eat(1 << 3 | 2) {
        let mut h = c.sub()?;
        if let Some(header) = memo.get(h.rest) {
            m.header = header;
            h.rest = &[];
        }
        let raw = h.rest;
        if h.eat(1 << 3) {
            m.header.cluster_id = h.varint()?;
        }
        if h.eat(2 << 3) {
            m.header.member_id = h.varint()?;
        }
        if h.eat(3 << 3) {
            m.header.revision = h.varint()? as i64;
        }
        if h.eat(4 << 3) {
            m.header.raft_term = h.varint()?;
        }
        h.done()?;
        memo.put(raw, m.header);
    }
    if c.eat(2 << 3) {
        m.watch_id = c.varint()? as i64;
    }
    if c.eat(3 << 3) {
        m.created = c.varint()? != 0;
    }
    if c.eat(4 << 3) {
        m.canceled = c.varint()? != 0;
    }
    if c.eat(5 << 3) {
        m.compact_revision = c.varint()? as i64;
    }
    if c.eat(6 << 3 | 2) {
        let reason = c.sub()?;
        m.cancel_reason
            .push_str(std::str::from_utf8(reason.rest).ok()?);
    }
    if c.eat(7 << 3) {
        m.fragment = c.varint()? != 0;
    }
    while c.eat(11 << 3 | 2) {
        let mut e = c.sub()?;
        let ev = m.events.push_empty()?;
        if e.eat(1 << 3) {
            ev.kind = if e.varint()? as i32 == mvccpb::event::EventType::Delete as i32 {
                EventKind::Delete
            } else {
                EventKind::Put
            };
        }
        if e.eat(2 << 3 | 2) {
            kv_in_order(ev.kv.pb_mut(), e.sub()?)?;
        }
        if e.eat(3 << 3 | 2) {
            let prev = ev
                .prev_kv
                .insert(Box::new(KeyValue::from_pb(mvccpb::KeyValue::default())));
            kv_in_order(prev.pb_mut(), e.sub()?)?;
        }
        e.done()?;
    }
    c.done()
}

#[allow(clippy::cast_possible_wrap)]
#[inline(always)]
fn kv_in_order(kv: &mut mvccpb::KeyValue, mut c: Cursor<'_>) -> Option<()> {
    if c.eat(1 << 3 | 2) {
        kv.key = c.bytes()?;
    }
    if c.eat(2 << 3) {
        kv.create_revision = c.varint()? as i64;
    }
    if c.eat(3 << 3) {
        kv.mod_revision = c.varint()? as i64;
    }
    if c.eat(4 << 3) {
        kv.version = c.varint()? as i64;
    }
    if c.eat(5 << 3 | 2) {
        kv.value = c.bytes()?;
    }
    if c.eat(6 << 3) {
        kv.lease = c.varint()? as i64;
    }
    c.done()
}

#[allow(clippy::cast_possible_wrap)]
fn merge_header(h: &mut pb::ResponseHeader, mut r: Reader<'_>) -> Option<()> {
    while r.more() {
        let (field, wt) = r.key()?;
        match field {
            1 => h.cluster_id = r.int(wt)?,
            2 => h.member_id = r.int(wt)?,
            3 => h.revision = r.int(wt)? as i64,
            4 => h.raft_term = r.int(wt)?,
            _ => r.skip(wt)?,
        }
    }
    Some(())
}

#[allow(clippy::cast_possible_truncation)]
fn merge_event(e: &mut Event, mut r: Reader<'_>) -> Option<()> {
    while r.more() {
        let (field, wt) = r.key()?;
        match field {
            1 => {
                e.kind = if r.int(wt)? as i32 == mvccpb::event::EventType::Delete as i32 {
                    EventKind::Delete
                } else {
                    EventKind::Put
                }
            }
            2 => merge_kv(e.kv.pb_mut(), r.message(wt)?)?,
            3 => merge_kv(
                e.prev_kv
                    .get_or_insert_with(|| Box::new(KeyValue::from_pb(mvccpb::KeyValue::default())))
                    .pb_mut(),
                r.message(wt)?,
            )?,
            _ => r.skip(wt)?,
        }
    }
    Some(())
}

#[allow(clippy::cast_possible_wrap)]
fn merge_kv(kv: &mut mvccpb::KeyValue, mut r: Reader<'_>) -> Option<()> {
    while r.more() {
        let (field, wt) = r.key()?;
        match field {
            1 if wt == LEN => kv.key = r.bytes()?,
            2 => kv.create_revision = r.int(wt)? as i64,
            3 => kv.mod_revision = r.int(wt)? as i64,
            4 => kv.version = r.int(wt)? as i64,
            5 if wt == LEN => kv.value = r.bytes()?,
            6 => kv.lease = r.int(wt)? as i64,
            1 | 5 => return None,
            _ => r.skip(wt)?,
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mvccpb;
    use bytes::{BufMut, BytesMut};

    /// Frame `msgs` as gRPC messages, cut the bytes into frames of `piece` bytes (so that
    /// messages straddle frames), end with an OK status, and decode them back through
    /// `MessageStream`.
    async fn round_trip_in(msgs: &[pb::WatchResponse], piece: usize) -> Vec<Response> {
        let mut body = BytesMut::new();
        for m in msgs {
            let enc = m.encode_to_vec();
            body.put_u8(0);
            body.put_u32(u32::try_from(enc.len()).unwrap_or(u32::MAX));
            body.put_slice(&enc);
        }
        let mut body = body.freeze();
        let mut frames = Vec::new();
        while !body.is_empty() {
            frames.push(body.split_to(piece.min(body.len())));
        }
        let mut stream = crate::grpc::MessageStream::for_test(frames, raw);
        let mut out = Vec::new();
        let mut m = Response::default();
        let mut memo = HeaderMemo::default();
        while let Some(b) = stream.message().await.unwrap() {
            decode_into(b, &mut m, &mut memo).unwrap();
            out.push(std::mem::take(&mut m));
        }
        out
    }

    async fn round_trip(msgs: Vec<pb::WatchResponse>) -> Vec<Response> {
        let whole = round_trip_in(&msgs, usize::MAX).await;
        for piece in [1, 7, 64] {
            assert_eq!(
                round_trip_in(&msgs, piece).await,
                whole,
                "frames of {piece} bytes"
            );
        }
        whole
    }

    /// Every varint length (1-10 bytes), canonical and padded encodings, at every distance
    /// from the end of the buffer (the word path and the byte path), overlong and truncated
    /// ones: the same value and length as prost's decoder, or a refusal where prost refuses.
    #[test]
    fn varints_decode_like_prost() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut values: Vec<u64> = vec![0, 1, 127, 128, 16_383, 16_384, u64::MAX, 1 << 63];
        for bits in 1..=64u32 {
            let top = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            values.push(top);
            values.push(rng.next() & top);
        }
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for v in values {
            let mut b = Vec::new();
            prost::encoding::encode_varint(v, &mut b);
            cases.push(b.clone());
            // Padded with 0x80 continuation bytes up to 10 bytes (prost accepts these).
            if b.len() < 10 {
                let last = b.len() - 1;
                let mut padded = b.clone();
                padded[last] |= 0x80;
                padded.extend(std::iter::repeat_n(0x80, 9 - b.len()));
                padded.push(0);
                cases.push(padded);
            }
        }
        // Overlong (an 11th byte needed, or a 10th byte above 1) and truncated.
        cases.push(vec![0xff; 10]);
        cases.push([vec![0xff; 9], vec![0x02]].concat());
        cases.push(vec![0xff; 4]);
        cases.push(vec![0x80; 9]);
        for case in cases {
            for tail in [0usize, 1, 3, 8, 12] {
                let mut data = case.clone();
                data.extend(std::iter::repeat_n(0x55, tail));
                let buf = Bytes::from(data.clone());
                let mut r = Reader::new(&buf);
                let ours = r.varint().map(|v| (v, r.pos));
                let mut slice = &data[..];
                let theirs = prost::encoding::decode_varint(&mut slice)
                    .ok()
                    .map(|v| (v, data.len() - slice.len()));
                assert_eq!(ours, theirs, "{case:02x?} + {tail} bytes");
            }
        }
    }

    /// xorshift64*: deterministic test data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        /// Small, large and negative values alike.
        fn int(&mut self) -> i64 {
            match self.below(4) {
                0 => 0,
                1 => self.below(300) as i64,
                2 => -(self.below(1000) as i64),
                _ => self.next() as i64,
            }
        }
        fn bytes(&mut self) -> Bytes {
            let len = [0, 1, 8, 127, 128, 300][self.below(6) as usize];
            (0..len).map(|_| self.next() as u8).collect()
        }
        fn kv(&mut self) -> mvccpb::KeyValue {
            mvccpb::KeyValue {
                key: self.bytes(),
                create_revision: self.int(),
                mod_revision: self.int(),
                version: self.int(),
                value: self.bytes(),
                lease: self.int(),
            }
        }
        fn response(&mut self) -> pb::WatchResponse {
            let events = (0..self.below(4))
                .map(|_| mvccpb::Event {
                    r#type: self.int() as i32,
                    kv: (self.below(8) > 0).then(|| self.kv()),
                    prev_kv: (self.below(2) > 0).then(|| self.kv()),
                })
                .collect();
            pb::WatchResponse {
                header: (self.below(8) > 0).then(|| pb::ResponseHeader {
                    cluster_id: self.next(),
                    member_id: self.next(),
                    revision: self.int(),
                    raft_term: self.next(),
                }),
                watch_id: self.int(),
                created: self.below(2) == 0,
                canceled: self.below(2) == 0,
                compact_revision: self.int(),
                cancel_reason: ["", "etcdserver: permission denied", "é ✓"][self.below(3) as usize]
                    .into(),
                fragment: self.below(2) == 0,
                events,
            }
        }
    }

    /// The fast path alone, into a response that held an earlier message (so that leftovers
    /// would show).
    fn fast(b: &Bytes) -> Option<Response> {
        let mut m = Response {
            watch_id: 99,
            created: true,
            cancel_reason: "left over".into(),
            events: Events::from_vec(vec![Event::from_pb(mvccpb::Event::default()); 2]),
            ..Default::default()
        };
        decode_response(b, &mut m, &mut HeaderMemo::default()).map(|()| m)
    }

    fn prost_decode(b: &[u8]) -> Option<Response> {
        pb::WatchResponse::decode(Bytes::copy_from_slice(b))
            .ok()
            .map(Response::from_pb)
    }

    #[test]
    fn fast_path_equals_prost() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut memo = HeaderMemo::default();
        for _ in 0..3000 {
            let m = rng.response();
            let enc = Bytes::from(m.encode_to_vec());
            let want = Response::from_pb(m);
            // The straight path alone takes every message prost writes (fields in order).
            let mut straight = Response::default();
            assert_eq!(
                decode_in_order(&enc, &mut straight, &mut HeaderMemo::default()),
                Some(())
            );
            assert_eq!(straight, want);
            // And again with the header remembered from this message and the one before.
            let mut again = Response::default();
            assert_eq!(decode_in_order(&enc, &mut again, &mut memo), Some(()));
            assert_eq!(again, want);
            let mut twice = Response::default();
            assert_eq!(decode_in_order(&enc, &mut twice, &mut memo), Some(()));
            assert_eq!(twice, want);
            assert_eq!(fast(&enc), Some(want));
        }
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut rng = Rng(7);
        let m = rng.response();
        let mut enc = m.encode_to_vec();
        // Field 99 as a varint, a 64-bit, a length-delimited and a 32-bit value.
        for (wt, body) in [
            (0u8, vec![0x96, 0x01]),
            (1, vec![1; 8]),
            (2, vec![3, b'a', b'b', b'c']),
            (5, vec![1; 4]),
        ] {
            let key = 99u32 << 3 | u32::from(wt);
            enc.extend_from_slice(&[(key & 0x7f) as u8 | 0x80, (key >> 7) as u8]);
            enc.extend_from_slice(&body);
        }
        let enc = Bytes::from(enc);
        let m = Response::from_pb(m);
        assert_eq!(prost_decode(&enc).as_ref(), Some(&m));
        assert_eq!(fast(&enc), Some(m));
    }

    /// Damaged messages: whatever the fast path accepts, prost decodes the same way.
    #[test]
    fn fast_path_never_disagrees_with_prost() {
        let mut rng = Rng(42);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut enc = rng.response().encode_to_vec();
            if enc.is_empty() {
                continue;
            }
            match rng.below(3) {
                0 => enc.truncate(rng.below(enc.len() as u64) as usize),
                1 => {
                    let i = rng.below(enc.len() as u64) as usize;
                    enc[i] = rng.next() as u8;
                }
                _ => {
                    let i = rng.below(enc.len() as u64) as usize;
                    enc[i] ^= 1 << rng.below(8);
                }
            }
            let enc = Bytes::from(enc);
            if let Some(fast) = fast(&enc) {
                accepted += 1;
                assert_eq!(prost_decode(&enc), Some(fast), "{enc:?}");
            }
        }
        assert!(accepted > 1000, "{accepted}");
    }

    #[tokio::test]
    async fn decodes_like_prost() {
        let kv = |k: &'static [u8], v: &'static [u8], rev| mvccpb::KeyValue {
            key: Bytes::from_static(k),
            value: Bytes::from_static(v),
            create_revision: 2,
            mod_revision: rev,
            version: 3,
            lease: 7,
        };
        let msgs = vec![
            pb::WatchResponse {
                header: Some(pb::ResponseHeader {
                    cluster_id: 1,
                    member_id: 2,
                    revision: 10,
                    raft_term: 4,
                }),
                watch_id: 1 << 41 | 5,
                events: vec![
                    mvccpb::Event {
                        r#type: 0,
                        kv: Some(kv(b"a", b"1", 9)),
                        prev_kv: Some(kv(b"a", b"0", 8)),
                    },
                    mvccpb::Event {
                        r#type: 1,
                        kv: Some(kv(b"b", b"", 10)),
                        prev_kv: None,
                    },
                ],
                ..Default::default()
            },
            pb::WatchResponse {
                watch_id: -1,
                created: true,
                canceled: true,
                compact_revision: 3,
                cancel_reason: "etcdserver: permission denied".into(),
                fragment: true,
                ..Default::default()
            },
            pb::WatchResponse::default(),
        ];
        let want: Vec<Response> = msgs.iter().cloned().map(Response::from_pb).collect();
        assert_eq!(round_trip(msgs).await, want);
    }
}
