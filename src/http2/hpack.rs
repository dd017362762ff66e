//! HPACK, the header compression of HTTP/2 (RFC 7541): integers and strings (§5), the
//! Huffman code (Appendix B), the static table (Appendix A), the dynamic table (§2.3, §4) and
//! every field representation a peer may send (§6).
//!
//! The [`Decoder`] takes any valid header block. The [`Encoder`] is made for the few headers a
//! gRPC client sends: static-table names and values by index, other fields as literals added
//! to the dynamic table (so a repeated `:path`, `:authority` or `grpc-timeout` costs one byte
//! the next time), strings without Huffman coding (cheaper to produce; the request headers are
//! short).

use std::collections::VecDeque;
use std::fmt;

/// Why a header block could not be decoded (a COMPRESSION_ERROR for the connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HpackError(&'static str);

impl fmt::Display for HpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HPACK: {}", self.0)
    }
}

impl std::error::Error for HpackError {}

type Result<T> = std::result::Result<T, HpackError>;

// ---- integers and strings (§5) ----

/// Decode an integer with an `n`-bit prefix from `buf[*pos..]` (the prefix's high bits, the
/// representation's flags, are masked off). Values above 2^28 are refused: no header block
/// field needs them and they would only serve to overflow.
fn decode_int(buf: &[u8], pos: &mut usize, n: u8) -> Result<usize> {
    let first = *buf.get(*pos).ok_or(HpackError("truncated integer"))?;
    *pos += 1;
    let max = (1usize << n) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos).ok_or(HpackError("truncated integer"))?;
        *pos += 1;
        // In u64: on a 32-bit target the fifth byte's bits would be shifted out of a usize.
        let wide = value as u64 + (u64::from(b & 0x7f) << shift);
        if wide > 1 << 28 {
            return Err(HpackError("integer too large"));
        }
        value = wide as usize; // at most 2^28: fits
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 28 {
            // Continuation bytes that add nothing (0x80): refused before the shift grows.
            return Err(HpackError("integer too long"));
        }
    }
}

/// Append `value` with an `n`-bit prefix whose high bits are `flags`.
fn encode_int(out: &mut Vec<u8>, flags: u8, n: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Decode a string literal (plain or Huffman-coded) into `out` (cleared first).
fn decode_string(buf: &[u8], pos: &mut usize, out: &mut Vec<u8>) -> Result<()> {
    let huffman = buf.get(*pos).ok_or(HpackError("truncated string"))? & 0x80 != 0;
    let len = decode_int(buf, pos, 7)?;
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= buf.len())
        .ok_or(HpackError("truncated string"))?;
    let bytes = &buf[*pos..end];
    *pos = end;
    out.clear();
    if huffman {
        huffman_decode(bytes, out)
    } else {
        out.extend_from_slice(bytes);
        Ok(())
    }
}

/// Append a plain (not Huffman-coded) string literal.
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

// ---- the Huffman code (Appendix B) ----

/// The bit length of each symbol's code (0-255, then EOS at 256), as RFC 7541 Appendix B
/// lists them. The code is canonical: the codes themselves follow from the lengths (shorter
/// codes first, then by symbol), see [`HUFFMAN`].
const HUFFMAN_LENGTHS: [u8; 257] = [
    // Symbols 0-15, 16-31, ... 240-255, then EOS.
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// The longest code (EOS's).
const MAX_LEN: usize = 30;

/// The canonical Huffman code built from [`HUFFMAN_LENGTHS`]: each symbol's code (right
/// aligned), the first code of each length, the number of codes of each length and the
/// symbols sorted by (length, symbol).
struct Huffman {
    code: [u32; 257],
    first: [u32; MAX_LEN + 1],
    count: [u16; MAX_LEN + 1],
    /// Index into `sorted` of the first symbol of each length.
    offset: [u16; MAX_LEN + 1],
    sorted: [u16; 257],
}

const fn build_huffman() -> Huffman {
    let mut h = Huffman {
        code: [0; 257],
        first: [0; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        offset: [0; MAX_LEN + 1],
        sorted: [0; 257],
    };
    let mut next: u32 = 0;
    let mut placed: u16 = 0;
    let mut len = 1;
    while len <= MAX_LEN {
        h.first[len] = next;
        h.offset[len] = placed;
        let mut sym = 0;
        while sym < 257 {
            if HUFFMAN_LENGTHS[sym] as usize == len {
                h.code[sym] = next;
                h.sorted[placed as usize] = sym as u16;
                next += 1;
                placed += 1;
                h.count[len] += 1;
            }
            sym += 1;
        }
        next <<= 1;
        len += 1;
    }
    h
}

static HUFFMAN: Huffman = build_huffman();

/// The EOS symbol: never valid inside a string.
const EOS: u16 = 256;

/// Decode a Huffman-coded string. The end may be padded with at most 7 one bits (the start of
/// EOS); anything else there, or an EOS symbol, is an error (§5.2).
fn huffman_decode(bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let h = &HUFFMAN;
    // `acc` holds `bits` not yet decoded bits, right aligned.
    let mut acc: u64 = 0;
    let mut bits: usize = 0;
    let mut input = bytes.iter();
    loop {
        // Keep at least MAX_LEN bits at hand while input lasts.
        while bits <= 56 - 8 {
            match input.next() {
                Some(&b) => {
                    acc = (acc << 8) | u64::from(b);
                    bits += 8;
                }
                None => break,
            }
        }
        if bits == 0 {
            return Ok(());
        }
        // Find the length of the code starting at the top of `acc`: canonical codes of
        // length `len` are the values in first[len]..first[len] + count[len].
        let mut found = None;
        let mut len = 5;
        while len <= MAX_LEN.min(bits) {
            let code = ((acc >> (bits - len)) & ((1u64 << len) - 1)) as u32;
            let count = u32::from(h.count[len]);
            if count > 0 && code >= h.first[len] && code - h.first[len] < count {
                let sym = h.sorted[usize::from(h.offset[len]) + (code - h.first[len]) as usize];
                found = Some((sym, len));
                break;
            }
            len += 1;
        }
        match found {
            Some((EOS, _)) => return Err(HpackError("EOS in a Huffman string")),
            Some((sym, len)) => {
                out.push(sym as u8);
                bits -= len;
                acc &= (1u64 << bits).wrapping_sub(1);
            }
            None => {
                // No complete code left: what remains must be padding, at most 7 one bits.
                let all_ones = (1u64 << bits) - 1;
                if bits <= 7 && acc == all_ones && input.len() == 0 {
                    return Ok(());
                }
                return Err(HpackError("invalid Huffman padding or code"));
            }
        }
    }
}

/// Huffman-code `s` (used by tests; the encoder sends plain strings).
#[cfg(test)]
fn huffman_encode(s: &[u8], out: &mut Vec<u8>) {
    let h = &HUFFMAN;
    let mut acc: u64 = 0;
    let mut bits = 0usize;
    for &b in s {
        let len = usize::from(HUFFMAN_LENGTHS[usize::from(b)]);
        acc = (acc << len) | u64::from(h.code[usize::from(b)]);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
        acc &= (1u64 << bits).wrapping_sub(1);
    }
    if bits > 0 {
        // Pad with the most significant bits of EOS (all ones).
        let pad = 8 - bits;
        out.push(((acc << pad) | ((1u64 << pad) - 1)) as u8);
    }
}

// ---- the tables (Appendix A, §2.3) ----

/// The static table (Appendix A), index 1 first.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The overhead HPACK counts per dynamic-table entry (§4.1).
const ENTRY_OVERHEAD: usize = 32;

/// One dynamic-table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// A dynamic table (§2.3.2): newest entry first, evicted from the oldest when over `max`.
#[derive(Debug, Default)]
struct DynamicTable {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl DynamicTable {
    fn new(max: usize) -> Self {
        DynamicTable {
            entries: VecDeque::new(),
            size: 0,
            max,
        }
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            match self.entries.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }

    fn set_max(&mut self, max: usize) {
        self.max = max;
        self.evict_to(max);
    }

    /// Add an entry (§4.4): evict first; an entry larger than the table empties it.
    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max - size);
        self.entries.push_front((name.into(), value.into()));
        self.size += size;
    }

    /// Entry `index` of the combined index space (static first, then this table).
    fn get(&self, index: usize) -> Result<(&[u8], &[u8])> {
        match index {
            0 => Err(HpackError("index 0")),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => self
                .entries
                .get(index - 62)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or(HpackError("index beyond the dynamic table")),
        }
    }
}

// ---- decoding (§6) ----

/// The largest header list we decode (our SETTINGS_MAX_HEADER_LIST_SIZE): gRPC heads and
/// trailers are a few hundred bytes.
pub(crate) const MAX_HEADER_LIST: usize = 1024 * 1024;

/// Decodes the header blocks of one connection (it keeps the peer's dynamic table).
#[derive(Debug)]
pub(crate) struct Decoder {
    table: DynamicTable,
    /// The largest table size the peer may choose: our SETTINGS_HEADER_TABLE_SIZE.
    limit: usize,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Decoder {
    /// A decoder for a connection where we advertised `limit` as SETTINGS_HEADER_TABLE_SIZE
    /// (4096 unless we said otherwise).
    pub(crate) fn new(limit: usize) -> Self {
        Decoder {
            table: DynamicTable::new(limit),
            limit,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// Decode one complete header block, calling `field(name, value)` for each field in order.
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<()> {
        let mut pos = 0;
        let mut fields_seen = false;
        // The decoded list's size as RFC 9113 §6.5.2 counts it: a one-byte reference to a
        // table entry can stand for 4 KiB, so the compressed size alone bounds nothing.
        let mut list = 0usize;
        let mut count = |n: &[u8], v: &[u8]| {
            list += n.len() + v.len() + 32;
            if list > MAX_HEADER_LIST {
                Err(HpackError("header list too large"))
            } else {
                Ok(())
            }
        };
        while pos < block.len() {
            let b = block[pos];
            if b & 0x80 != 0 {
                // Indexed header field (§6.1).
                let index = decode_int(block, &mut pos, 7)?;
                let (n, v) = self.table.get(index)?;
                count(n, v)?;
                field(n, v);
                fields_seen = true;
            } else if b & 0xc0 == 0x40 {
                // Literal with incremental indexing (§6.2.1).
                self.literal(block, &mut pos, 6)?;
                count(&self.name, &self.value)?;
                field(&self.name, &self.value);
                self.table.insert(&self.name, &self.value);
                fields_seen = true;
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): only before the first field.
                if fields_seen {
                    return Err(HpackError("table size update after a field"));
                }
                let size = decode_int(block, &mut pos, 5)?;
                if size > self.limit {
                    return Err(HpackError("table size above our limit"));
                }
                self.table.set_max(size);
            } else {
                // Literal without indexing (0000) or never indexed (0001) (§6.2.2, §6.2.3).
                self.literal(block, &mut pos, 4)?;
                count(&self.name, &self.value)?;
                field(&self.name, &self.value);
                fields_seen = true;
            }
        }
        Ok(())
    }

    /// A literal field: its name (by index, or a literal when the index is 0), then its value,
    /// into `self.name` and `self.value`.
    fn literal(&mut self, block: &[u8], pos: &mut usize, prefix: u8) -> Result<()> {
        let index = decode_int(block, pos, prefix)?;
        if index == 0 {
            decode_string(block, pos, &mut self.name)?;
        } else {
            let (n, _) = self.table.get(index)?;
            self.name.clear();
            self.name.extend_from_slice(n);
        }
        decode_string(block, pos, &mut self.value)
    }
}

// ---- encoding ----

/// Encodes our request header blocks (it keeps our dynamic table, as the peer's decoder
/// does). Uses the default table size (4096): we never send a size update.
#[derive(Debug)]
pub(crate) struct Encoder {
    table: DynamicTable,
    /// Table size updates to announce at the start of the next block: the smallest size
    /// since the last block, then the current one (§4.2, §6.3).
    pending_update: Option<(usize, usize)>,
    /// Counts changes of the dynamic table (insertions, size changes). Indices stay valid
    /// while it stays the same.
    generation: u64,
    /// Encoded runs of fields (see [`Encoder::fields`]), each valid for one generation.
    memo: Vec<Memo>,
    /// The memo entry replaced next when none is stale.
    memo_next: usize,
}

/// A run of fields and its encoding, valid while the table is at `generation`.
#[derive(Debug)]
struct Memo {
    generation: u64,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    encoded: Vec<u8>,
}

/// How many encoded runs are remembered (a client's distinct request paths in use at once).
const MEMO_ENTRIES: usize = 8;

impl Default for Encoder {
    fn default() -> Self {
        Encoder {
            table: DynamicTable::new(4096),
            pending_update: None,
            generation: 0,
            memo: Vec::new(),
            memo_next: 0,
        }
    }
}

impl Encoder {
    /// The peer's SETTINGS_HEADER_TABLE_SIZE: our table is kept within it (and within the
    /// default 4096, which is all we use), announced at the start of the next block.
    pub(crate) fn set_peer_limit(&mut self, limit: u32) {
        let size = (limit as usize).min(4096);
        if size == self.table.max {
            return;
        }
        self.table.set_max(size);
        self.generation += 1;
        self.pending_update = Some(match self.pending_update {
            Some((low, _)) => (low.min(size), size),
            None => (size, size),
        });
    }

    /// The size our dynamic table is kept within.
    #[cfg(test)]
    pub(crate) fn table_limit(&self) -> usize {
        self.table.max
    }

    /// Start a header block: announces a changed table size first.
    pub(crate) fn begin_block(&mut self, out: &mut Vec<u8>) {
        if let Some((low, size)) = self.pending_update.take() {
            if low != size {
                encode_int(out, 0x20, 5, low);
            }
            encode_int(out, 0x20, 5, size);
        }
    }

    /// Append the representation of one field to `out`: an index when the static or dynamic
    /// table has the field, else a literal (name by index when a table has the name) added to
    /// the dynamic table.
    pub(crate) fn field(&mut self, name: &[u8], value: &[u8], out: &mut Vec<u8>) {
        // Exact matches in the dynamic table first: a client's repeated headers live there
        // after its first request. Lengths are compared before bytes.
        for (i, (n, v)) in self.table.entries.iter().enumerate() {
            if n.len() == name.len() && v.len() == value.len() && &n[..] == name && &v[..] == value
            {
                encode_int(out, 0x80, 7, 62 + i);
                return;
            }
        }
        let mut name_index = 0;
        for (i, (n, v)) in STATIC.iter().enumerate() {
            if n.len() == name.len() && n.as_bytes() == name {
                if v.as_bytes() == value {
                    encode_int(out, 0x80, 7, i + 1);
                    return;
                }
                if name_index == 0 {
                    name_index = i + 1;
                }
            }
        }
        if name_index == 0 {
            name_index = self
                .table
                .entries
                .iter()
                .position(|(n, _)| &n[..] == name)
                .map_or(0, |i| 62 + i);
        }
        encode_int(out, 0x40, 6, name_index);
        if name_index == 0 {
            encode_string(out, name);
        }
        encode_string(out, value);
        self.table.insert(name, value);
        self.generation += 1;
    }

    /// Append a run of fields, as [`field`](Self::field) would, from a memo when the same
    /// run was encoded before and the table has not changed since. A request's pseudo-headers
    /// and gRPC's constant fields are the same on every request of a path: once they are all
    /// in the table, their encoding (indices only) is copied instead of looked up field by
    /// field.
    pub(crate) fn fields(&mut self, run: &[(&[u8], &[u8])], out: &mut Vec<u8>) {
        let generation = self.generation;
        let same = |m: &Memo| {
            m.generation == generation
                && m.fields.len() == run.len()
                && m.fields
                    .iter()
                    .zip(run)
                    .all(|((n, v), (rn, rv))| n == rn && v == rv)
        };
        if let Some(m) = self.memo.iter().find(|m| same(m)) {
            out.extend_from_slice(&m.encoded);
            return;
        }
        let start = out.len();
        for (n, v) in run {
            self.field(n, v, out);
        }
        if self.generation != generation {
            return; // something was added: the next run will find it all indexed
        }
        let memo = Memo {
            generation,
            fields: run.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
            encoded: out[start..].to_vec(),
        };
        if self.memo.len() < MEMO_ENTRIES {
            self.memo.push(memo);
        } else {
            let slot = match self.memo.iter().position(|m| m.generation != generation) {
                Some(stale) => stale,
                None => {
                    self.memo_next = (self.memo_next + 1) % MEMO_ENTRIES;
                    self.memo_next
                }
            };
            self.memo[slot] = memo;
        }
    }

    /// Append a field that is not to be indexed (a literal without indexing with a literal
    /// name, §6.2.2): for values that keep changing, such as `grpc-timeout`. Indexing those
    /// would fill the dynamic table with values never used again, push the fields that do
    /// repeat out of it, and make every look-up in [`field`](Self::field) walk past them.
    pub(crate) fn literal(&mut self, name: &[u8], value: &[u8], out: &mut Vec<u8>) {
        out.push(0);
        encode_string(out, name);
        encode_string(out, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>> {
        let mut fields = Vec::new();
        d.decode(block, |n, v| {
            fields.push((
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            ))
        })?;
        Ok(fields)
    }

    #[test]
    fn the_huffman_code_is_complete_and_prefix_free() {
        // Kraft: the lengths fill the code space exactly.
        let kraft: f64 = HUFFMAN_LENGTHS
            .iter()
            .map(|&l| 0.5f64.powi(i32::from(l)))
            .sum();
        assert!((kraft - 1.0).abs() < 1e-12, "{kraft}");
        assert_eq!(usize::from(HUFFMAN_LENGTHS[usize::from(EOS)]), MAX_LEN);
        // EOS is all ones (so padding with its first bits is ones).
        assert_eq!(HUFFMAN.code[usize::from(EOS)], (1 << MAX_LEN) - 1);
        // Codes built from the lengths are the ones Appendix B lists (a sample of rows).
        for (sym, code, len) in [
            (0usize, 0x1ff8u32, 13u8),
            (1, 0x7f_ffd8, 23),
            (10, 0x3fff_fffc, 30),
            (32, 0x14, 6),
            (48, 0x0, 5),
            (65, 0x21, 6),
            (97, 0x3, 5),
            (126, 0x1ffd, 13),
            (200, 0x3ff_ffe2, 26),
            (255, 0x3ff_ffee, 26),
        ] {
            assert_eq!(
                (HUFFMAN.code[sym], HUFFMAN_LENGTHS[sym]),
                (code, len),
                "{sym}"
            );
        }
    }

    #[test]
    fn overlong_integers_are_refused_without_overflow() {
        // A prefix full of ones, then continuation bytes that add nothing: refused, never a
        // shift past the width of the value.
        let mut block = vec![0xff];
        block.extend(std::iter::repeat_n(0x80, 20));
        block.push(0);
        let mut pos = 0;
        assert!(decode_int(&block, &mut pos, 7).is_err());
        let mut d = Decoder::new(4096);
        assert!(d.decode(&block, |_, _| {}).is_err());
    }

    #[test]
    fn an_integer_whose_fifth_byte_carries_high_bits_is_refused() {
        // 127 + 0x7f + 0x7f<<7 + 0x7f<<14 + 1<<28 reaches the bound exactly; a fifth byte
        // of 0x0f or 0x10 would add bits beyond 32: refused whatever the width of usize.
        for last in [0x0f, 0x10] {
            let block = [0x7f, 0x81, 0xff, 0xff, 0xff, last];
            assert!(decode_int(&block, &mut 0, 7).is_err(), "{last:#x}");
        }
    }

    #[test]
    fn a_header_list_too_large_once_decoded_is_refused() {
        // One 4,000-byte field added to the table, then referenced again and again (one
        // byte each): 16 KiB of block that would decode to 49 MB.
        // A literal with incremental indexing and a new name "x" (§6.2.1), its value's
        // length with a 7-bit prefix (no Huffman).
        let mut block = vec![0x40, 0x01, b'x'];
        encode_int(&mut block, 0, 7, 4000);
        block.extend(std::iter::repeat_n(b'v', 4000));
        block.extend(std::iter::repeat_n(0xbe, 12_000)); // index 62: the new entry
        let mut d = Decoder::new(4096);
        let mut decoded = 0usize;
        let r = d.decode(&block, |n, v| decoded += n.len() + v.len());
        assert!(r.is_err(), "refused");
        assert!(
            decoded <= MAX_HEADER_LIST,
            "stopped at the bound: {decoded} bytes handed out"
        );
        // A list under the bound decodes.
        let mut small = block[..3].to_vec();
        encode_int(&mut small, 0, 7, 4000);
        small.extend(std::iter::repeat_n(b'v', 4000));
        small.extend(std::iter::repeat_n(0xbe, 10));
        let mut d = Decoder::new(4096);
        let fields = decode_all(&mut d, &small).unwrap();
        assert_eq!(fields.len(), 11);
    }

    #[test]
    fn integers_round_trip_at_every_prefix() {
        for n in 1..=8u8 {
            for v in [0usize, 1, 30, 31, 127, 128, 255, 1337, 1 << 20] {
                let mut out = Vec::new();
                encode_int(&mut out, 0, n, v);
                let mut pos = 0;
                assert_eq!(decode_int(&out, &mut pos, n), Ok(v), "n={n} v={v}");
                assert_eq!(pos, out.len());
            }
        }
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        encode_int(&mut out, 0, 5, 1337);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        // Truncated and oversized.
        assert!(decode_int(&[0x1f, 0x9a], &mut 0, 5).is_err());
        assert!(decode_int(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0x7f], &mut 0, 7).is_err());
    }

    #[test]
    fn huffman_strings_decode_and_round_trip() {
        // RFC 7541 C.4: Huffman-coded request strings.
        for (coded, plain) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
        ] {
            let mut out = Vec::new();
            huffman_decode(&hex(coded), &mut out).unwrap();
            assert_eq!(out, plain.as_bytes());
            let mut back = Vec::new();
            huffman_encode(plain.as_bytes(), &mut back);
            assert_eq!(back, hex(coded), "{plain}");
        }
        // Every byte value, alone and in runs.
        let all: Vec<u8> = (0..=255u8).collect();
        for s in [
            all.clone(),
            all.iter().rev().copied().collect(),
            vec![0u8; 40],
            vec![255; 9],
        ] {
            let mut coded = Vec::new();
            huffman_encode(&s, &mut coded);
            let mut out = Vec::new();
            huffman_decode(&coded, &mut out).unwrap();
            assert_eq!(out, s);
        }
        // Padding longer than 7 bits, padding that is not ones, and EOS are refused.
        let mut out = Vec::new();
        assert!(
            huffman_decode(&[0xff], &mut out).is_err(),
            "8 bits of padding"
        );
        // '0' is 00000; the 3 bits after it are zeros, not padding.
        assert!(huffman_decode(&[0x00], &mut out).is_err(), "zero padding");
        assert!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff], &mut out).is_err(),
            "EOS"
        );
    }

    #[test]
    fn decodes_the_rfc_request_examples_with_their_dynamic_table() {
        // RFC 7541 C.3 (plain) and C.4 (Huffman): three requests on one connection.
        for blocks in [
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            [
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
        ] {
            let mut d = Decoder::new(4096);
            let f = |n: &str, v: &str| (n.to_owned(), v.to_owned());
            assert_eq!(
                decode_all(&mut d, &hex(blocks[0])).unwrap(),
                vec![
                    f(":method", "GET"),
                    f(":scheme", "http"),
                    f(":path", "/"),
                    f(":authority", "www.example.com")
                ]
            );
            assert_eq!(
                decode_all(&mut d, &hex(blocks[1])).unwrap(),
                vec![
                    f(":method", "GET"),
                    f(":scheme", "http"),
                    f(":path", "/"),
                    f(":authority", "www.example.com"),
                    f("cache-control", "no-cache")
                ]
            );
            assert_eq!(
                decode_all(&mut d, &hex(blocks[2])).unwrap(),
                vec![
                    f(":method", "GET"),
                    f(":scheme", "https"),
                    f(":path", "/index.html"),
                    f(":authority", "www.example.com"),
                    f("custom-key", "custom-value")
                ]
            );
            // 57 + 53 + 54 bytes in the table (§4.1 sizes).
            assert_eq!(d.table.size, 164);
        }
    }

    #[test]
    fn evicts_and_honours_size_updates() {
        let mut d = Decoder::new(100);
        // A size update above our limit is refused; one within it evicts.
        assert!(
            d.decode(&[0x3f, 0x46], |_, _| {}).is_err(),
            "size 101 > 100"
        );
        let mut e = Encoder::default();
        let mut block = Vec::new();
        e.field(b"x-a", b"0123456789", &mut block); // 3 + 10 + 32 = 45
        e.field(b"x-b", b"0123456789", &mut block); // 90 in all
        e.field(b"x-c", b"0123456789", &mut block); // evicts x-a in a 100-byte table
        let fields = decode_all(&mut d, &block).unwrap();
        assert_eq!(fields.len(), 3);
        assert_eq!(d.table.entries.len(), 2);
        assert_eq!(d.table.get(62).unwrap().0, b"x-c");
        assert_eq!(d.table.get(63).unwrap().0, b"x-b");
        assert!(d.table.get(64).is_err());
        // A size update after a field is refused.
        assert!(d.decode(&[0x82, 0x20], |_, _| {}).is_err());
        // Size 0 empties the table.
        d.decode(&[0x20], |_, _| {}).unwrap();
        assert!(d.table.entries.is_empty());
        assert!(d.decode(&[0x80], |_, _| {}).is_err(), "index 0");
    }

    #[test]
    fn the_encoder_announces_and_keeps_a_smaller_peer_limit() {
        let mut e = Encoder::default();
        let mut d = Decoder::new(4096);
        let mut block = Vec::new();
        e.begin_block(&mut block);
        e.field(b"x-long", &[b'a'; 100], &mut block);
        assert_eq!(decode_all(&mut d, &block).unwrap().len(), 1);
        // The peer lowers its table to 64 bytes, then to 0 and back to 50 before the next
        // block: both the low point and the final size are announced.
        e.set_peer_limit(64);
        e.set_peer_limit(0);
        e.set_peer_limit(50);
        block.clear();
        e.begin_block(&mut block);
        // 0, then 50 (31 in the prefix, 19 after).
        assert_eq!(block, [0x20, 0x3f, 19]);
        e.field(b"x-long", &[b'a'; 100], &mut block);
        e.field(b"k", b"v", &mut block);
        e.field(b"k", b"v", &mut block);
        let fields = decode_all(&mut d, &block).unwrap();
        assert_eq!(fields.len(), 3);
        assert_eq!(fields[2], ("k".into(), "v".into()));
        assert!(e.table.size <= 50 && d.table.size <= 50);
    }

    #[test]
    fn memoised_runs_stay_correct_as_the_table_changes() {
        let mut e = Encoder::default();
        let mut d = Decoder::new(4096);
        let paths: Vec<Vec<u8>> = (0..12).map(|i| format!("/svc/M{i}").into_bytes()).collect();
        let mut indexed = 0;
        for round in 0..60usize {
            let path = &paths[round % paths.len()];
            let run: [(&[u8], &[u8]); 4] = [
                (b":method", b"POST"),
                (b":path", path),
                (b"te", b"trailers"),
                (b"content-type", b"application/grpc"),
            ];
            let mut block = Vec::new();
            e.begin_block(&mut block);
            let before = e.generation;
            e.fields(&run, &mut block);
            if e.generation == before && block.len() == run.len() {
                indexed += 1;
            }
            // Changing fields: a literal never indexed, and now and then a new indexed one
            // (which shifts every index) or a smaller table (which evicts).
            e.literal(b"grpc-timeout", format!("{round}m").as_bytes(), &mut block);
            if round % 7 == 3 {
                e.field(b"x-new", format!("{round}").as_bytes(), &mut block);
            }
            if round == 40 {
                e.set_peer_limit(200);
            }
            let got = decode_all(&mut d, &block).unwrap();
            let mut want: Vec<(String, String)> = run
                .iter()
                .map(|(n, v)| {
                    (
                        String::from_utf8_lossy(n).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect();
            want.push(("grpc-timeout".into(), format!("{round}m")));
            if round % 7 == 3 {
                want.push(("x-new".into(), format!("{round}")));
            }
            assert_eq!(got, want, "round {round}");
        }
        assert!(indexed > 20, "runs are sent as indices ({indexed})");
        // A literal never indexed leaves the table alone.
        assert!(
            d.table
                .entries
                .iter()
                .all(|(n, _)| &n[..] != b"grpc-timeout")
        );
    }

    #[test]
    fn the_encoder_indexes_what_repeats() {
        let mut e = Encoder::default();
        let mut d = Decoder::new(4096);
        let headers: [(&[u8], &[u8]); 7] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/etcdserverpb.KV/Put"),
            (b":authority", b"127.0.0.1:2379"),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
            (b"grpc-timeout", b"5000m"),
        ];
        let mut first = Vec::new();
        for (n, v) in headers {
            e.field(n, v, &mut first);
        }
        let mut second = Vec::new();
        for (n, v) in headers {
            e.field(n, v, &mut second);
        }
        // The second block is one byte per field.
        assert_eq!(second.len(), headers.len());
        for block in [&first, &second] {
            let fields = decode_all(&mut d, block).unwrap();
            let want: Vec<(String, String)> = headers
                .iter()
                .map(|(n, v)| {
                    (
                        String::from_utf8_lossy(n).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect();
            assert_eq!(fields, want);
        }
    }
}
