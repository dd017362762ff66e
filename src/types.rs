//! Types shared by every API: the response header, key-value pairs, and byte conversions.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::proto::{etcdserverpb as pb, mvccpb};

/// The header of every etcd response: which cluster and member answered, and at which store
/// revision and raft term.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseHeader {
    /// ID of the cluster that answered.
    pub cluster_id: u64,
    /// ID of the member that answered.
    pub member_id: u64,
    /// The key-value store revision when the request was applied (for a write: the revision
    /// the write created).
    pub revision: i64,
    /// The raft term when the request was applied.
    pub raft_term: u64,
}

impl ResponseHeader {
    /// Servers always send a header; a missing one (never seen from etcd) reads as zeros.
    pub(crate) fn from_pb(h: Option<pb::ResponseHeader>) -> Self {
        let h = h.unwrap_or_default();
        ResponseHeader {
            cluster_id: h.cluster_id,
            member_id: h.member_id,
            revision: h.revision,
            raft_term: h.raft_term,
        }
    }
}

/// A key-value pair as stored by etcd, with its revision metadata.
///
/// Keys and values are [`Bytes`] sliced from the response buffer (no copy); the `*_str`
/// accessors view them as UTF-8.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    inner: mvccpb::KeyValue,
}

impl KeyValue {
    pub(crate) fn from_pb(inner: mvccpb::KeyValue) -> Self {
        KeyValue { inner }
    }

    /// The protobuf message, for decoding straight into the pair.
    pub(crate) fn pb_mut(&mut self) -> &mut mvccpb::KeyValue {
        &mut self.inner
    }

    /// The same pair with the first `len` bytes of its key removed (a namespace prefix).
    pub(crate) fn strip_key_prefix(mut self, len: usize) -> Self {
        let len = len.min(self.inner.key.len());
        self.inner.key = self.inner.key.slice(len..);
        self
    }

    /// The key.
    pub fn key(&self) -> &Bytes {
        &self.inner.key
    }

    /// The key as UTF-8, or an [`ErrorKind::InvalidArgument`](crate::ErrorKind) error.
    pub fn key_str(&self) -> Result<&str> {
        utf8(&self.inner.key, "key")
    }

    /// The value (empty for a keys-only read or a delete event).
    pub fn value(&self) -> &Bytes {
        &self.inner.value
    }

    /// The value as UTF-8, or an [`ErrorKind::InvalidArgument`](crate::ErrorKind) error.
    pub fn value_str(&self) -> Result<&str> {
        utf8(&self.inner.value, "value")
    }

    /// The revision of the write that created this key (0 for a deleted key in an event).
    pub fn create_revision(&self) -> i64 {
        self.inner.create_revision
    }

    /// The revision of the last write to this key.
    pub fn mod_revision(&self) -> i64 {
        self.inner.mod_revision
    }

    /// How many times this key was written since it was created (1 after creation).
    pub fn version(&self) -> i64 {
        self.inner.version
    }

    /// The lease attached to this key, or 0 for none.
    pub fn lease(&self) -> i64 {
        self.inner.lease
    }

    /// Split into key and value without copying.
    pub fn into_key_value(self) -> (Bytes, Bytes) {
        (self.inner.key, self.inner.value)
    }
}

impl std::fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &String::from_utf8_lossy(&self.inner.key))
            .field("value", &String::from_utf8_lossy(&self.inner.value))
            .field("create_revision", &self.inner.create_revision)
            .field("mod_revision", &self.inner.mod_revision)
            .field("version", &self.inner.version)
            .field("lease", &self.inner.lease)
            .finish()
    }
}

fn utf8<'a>(b: &'a [u8], what: &str) -> Result<&'a str> {
    std::str::from_utf8(b)
        .map_err(|e| Error::invalid_argument(format!("{what} is not valid UTF-8")).with_source(e))
}

/// Anything that can become the bytes of a key or value.
///
/// Implemented for strings, byte slices, vectors and [`Bytes`] (moved in without a copy).
pub trait IntoBytes {
    /// Convert into [`Bytes`].
    fn into_bytes(self) -> Bytes;
}

impl IntoBytes for Bytes {
    fn into_bytes(self) -> Bytes {
        self
    }
}
impl IntoBytes for &Bytes {
    fn into_bytes(self) -> Bytes {
        self.clone()
    }
}
impl IntoBytes for Vec<u8> {
    fn into_bytes(self) -> Bytes {
        Bytes::from(self)
    }
}
impl IntoBytes for &Vec<u8> {
    fn into_bytes(self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}
impl IntoBytes for String {
    fn into_bytes(self) -> Bytes {
        Bytes::from(self)
    }
}
impl IntoBytes for &String {
    fn into_bytes(self) -> Bytes {
        Bytes::copy_from_slice(self.as_bytes())
    }
}
impl IntoBytes for &str {
    fn into_bytes(self) -> Bytes {
        Bytes::copy_from_slice(self.as_bytes())
    }
}
impl IntoBytes for &[u8] {
    fn into_bytes(self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}
impl<const N: usize> IntoBytes for &[u8; N] {
    fn into_bytes(self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}

/// The range end that selects every key starting with `prefix` (etcd's `GetPrefixRangeEnd`):
/// the prefix with its last byte below 0xff incremented and everything after it dropped; for
/// an empty or all-0xff prefix, `"\0"` (every key from the start key on).
pub(crate) fn prefix_range_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(b"\0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end() {
        assert_eq!(&prefix_range_end(b"abc")[..], b"abd");
        assert_eq!(&prefix_range_end(b"a\xff")[..], b"b");
        assert_eq!(&prefix_range_end(b"\xff\xff")[..], b"\0");
        assert_eq!(&prefix_range_end(b"")[..], b"\0");
    }
}
