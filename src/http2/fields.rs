//! The fields of a received header block (a head or trailers), kept without a `HeaderMap`.
//!
//! Every gRPC answer carries the same few fields: `content-type: application/grpc` in its
//! head, `grpc-status: 0` and an empty `grpc-message` in its trailers. A `HeaderMap` for
//! each block cost two allocations and a hash per field on every call; here those common
//! fields are flags, and any other field is appended, length-prefixed, to one buffer that
//! stays unallocated when there is none. Lookups scan (a block has a handful of fields);
//! [`Fields::to_header_map`] builds the map for tonic's generated clients and for statuses.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `content-type: application/grpc`.
const GRPC_CONTENT_TYPE: u8 = 1;
/// `grpc-status: 0`.
const GRPC_OK: u8 = 2;
/// `grpc-message` with an empty value.
const EMPTY_MESSAGE: u8 = 4;

/// The common fields, in the order they are reported: flag, name, value.
const COMMON: [(u8, &str, &str); 3] = [
    (GRPC_CONTENT_TYPE, "content-type", "application/grpc"),
    (GRPC_OK, "grpc-status", "0"),
    (EMPTY_MESSAGE, "grpc-message", ""),
];

/// A header block's regular fields (pseudo-headers apart), validated as they were added.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Fields {
    /// Which common fields were present (each at most once as a flag; a repeat goes to
    /// `rest`).
    common: u8,
    /// Other fields: name length (u32 LE), value length (u32 LE), name, value.
    rest: Vec<u8>,
}

impl Fields {
    /// Add a field; `false` (and nothing added) when the name or value is not valid in
    /// HTTP/2 (a name must be a lowercase token, a value must have no control characters).
    pub(crate) fn push(&mut self, name: &[u8], value: &[u8]) -> bool {
        for &(flag, n, v) in &COMMON {
            if name == n.as_bytes() && value == v.as_bytes() && self.common & flag == 0 {
                self.common |= flag;
                return true;
            }
        }
        if !valid_name(name) || !valid_value(value) {
            return false;
        }
        let (Ok(nl), Ok(vl)) = (u32::try_from(name.len()), u32::try_from(value.len())) else {
            return false;
        };
        self.rest.extend_from_slice(&nl.to_le_bytes());
        self.rest.extend_from_slice(&vl.to_le_bytes());
        self.rest.extend_from_slice(name);
        self.rest.extend_from_slice(value);
        true
    }

    /// Every field, the common ones first, the others in the order they came.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let common = COMMON
            .iter()
            .filter(|(flag, _, _)| self.common & flag != 0)
            .map(|&(_, n, v)| (n.as_bytes(), v.as_bytes()));
        let mut rest = &self.rest[..];
        let others = std::iter::from_fn(move || {
            let (nl, vl) = (le32(rest.get(..4)?)?, le32(rest.get(4..8)?)?);
            let name = rest.get(8..8 + nl)?;
            let value = rest.get(8 + nl..8 + nl + vl)?;
            rest = &rest[8 + nl + vl..];
            Some((name, value))
        });
        common.chain(others)
    }

    /// The value of the first field named `name` (lowercase).
    pub(crate) fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// Whether a field named `name` (lowercase) is present.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The fields as a `HeaderMap` (repeated names kept, in order).
    pub(crate) fn to_header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in self.iter() {
            // Both were validated when added, so these conversions do not fail.
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
                map.append(n, v);
            }
        }
        map
    }

    /// The fields of `map` (test helper for bodies built from `HeaderMap`s).
    #[cfg(test)]
    pub(crate) fn from_header_map(map: &HeaderMap) -> Fields {
        let mut f = Fields::default();
        for (n, v) in map {
            f.push(n.as_str().as_bytes(), v.as_bytes());
        }
        f
    }
}

fn le32(b: &[u8]) -> Option<usize> {
    let b: [u8; 4] = b.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(b)).ok()
}

/// A field name HTTP/2 allows: a non-empty token (RFC 9110 §5.6.2) without uppercase.
fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.iter().all(|&b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// A field value the `http` crate takes: no control characters but tab, no DEL.
fn valid_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_fields_are_flags_and_others_are_kept_in_order() {
        let mut f = Fields::default();
        assert_eq!(f.iter().count(), 0);
        assert!(f.push(b"content-type", b"application/grpc"));
        assert!(f.rest.is_empty(), "the common field is a flag");
        assert!(f.push(b"grpc-status", b"0"));
        assert!(f.push(b"grpc-message", b""));
        assert!(f.rest.is_empty());
        assert!(f.push(b"x-a", b"1"));
        assert!(f.push(b"x-a", b"2"));
        // A repeated common field is kept as an ordinary one.
        assert!(f.push(b"grpc-status", b"0"));
        assert_eq!(f.get("content-type"), Some(&b"application/grpc"[..]));
        assert_eq!(f.get("grpc-status"), Some(&b"0"[..]));
        assert_eq!(f.get("grpc-message"), Some(&b""[..]));
        assert_eq!(f.get("x-a"), Some(&b"1"[..]));
        assert!(!f.contains("x-b"));
        let all: Vec<_> = f.iter().collect();
        assert_eq!(all.len(), 6);
        assert_eq!(all[3], (&b"x-a"[..], &b"1"[..]));
        assert_eq!(all[4], (&b"x-a"[..], &b"2"[..]));
        let map = f.to_header_map();
        assert_eq!(map.len(), 6);
        let xs: Vec<_> = map.get_all("x-a").iter().collect();
        assert_eq!(xs, ["1", "2"]);
        assert_eq!(map.get_all("grpc-status").iter().count(), 2);
        assert_eq!(Fields::from_header_map(&map).to_header_map(), map);
    }

    #[test]
    fn a_different_value_of_a_common_name_is_kept_as_it_is() {
        let mut f = Fields::default();
        assert!(f.push(b"grpc-status", b"5"));
        assert!(f.push(b"grpc-message", b"etcdserver: key not found"));
        assert!(f.push(b"content-type", b"application/grpc+proto"));
        assert_eq!(f.get("grpc-status"), Some(&b"5"[..]));
        assert_eq!(
            f.get("grpc-message"),
            Some(&b"etcdserver: key not found"[..])
        );
        assert_eq!(f.get("content-type"), Some(&b"application/grpc+proto"[..]));
        assert_eq!(f.iter().count(), 3);
    }

    #[test]
    fn invalid_names_and_values_are_refused() {
        let mut f = Fields::default();
        assert!(!f.push(b"", b"x"));
        assert!(!f.push(b"Upper", b"x"));
        assert!(!f.push(b"sp ace", b"x"));
        assert!(!f.push(b"colon:", b"x"));
        assert!(!f.push(b"x", b"a\nb"));
        assert!(!f.push(b"x", b"a\x7fb"));
        assert_eq!(f.iter().count(), 0);
        assert!(f.push(b"x", b"tab\tand \xc3\xa9"));
        assert_eq!(f.to_header_map().len(), 1);
    }
}
