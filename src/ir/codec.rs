//! The binary format: a small header, then bincode.
//!
//! Layout: 4 magic bytes naming the kind of document (`APIR` for graphs), the format
//! version as a little-endian `u16` ([`FORMAT_VERSION`]), then the bincode 2
//! (standard configuration) encoding of the document, and nothing after it. Graphs are
//! written as a [`GraphDoc`], the document the JSON form uses, with ops as names and
//! named attributes so the bytes do not depend on the order of the op table.
//!
//! This is the only module that uses bincode. [`encode`] and [`decode`] work for any
//! serde document type, so other documents (plans) can get their own magic and share
//! the header and the error handling. Decoding never panics: arbitrary bytes give a
//! [`CodecError`].

use super::graph::Graph;
use super::json::{DocError, GraphDoc};
use bincode::error::{DecodeError, EncodeError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Magic bytes of an encoded graph.
pub const GRAPH_MAGIC: [u8; 4] = *b"APIR";

/// The version this code writes and reads. Bump it on any change of the encoding.
pub const FORMAT_VERSION: u16 = 1;

/// Bytes before the payload: magic and version.
pub const HEADER_LEN: usize = 6;

/// Most bytes a decoder lets one document claim (lengths of strings and lists), so
/// corrupt lengths cannot make it allocate without bound.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 30;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_DOCUMENT_BYTES>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_DOCUMENT_BYTES>()
}

/// Bytes that are not a valid encoded document.
#[derive(Debug, Error)]
pub enum CodecError {
    /// Shorter than the header.
    #[error("input is {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    TruncatedHeader {
        /// Input length.
        len: usize,
    },
    /// The magic bytes name another kind of document.
    #[error("bad magic bytes {found:?} (expected {expected:?})")]
    BadMagic {
        /// Expected magic.
        expected: [u8; 4],
        /// Magic found.
        found: [u8; 4],
    },
    /// Written by another version of the format.
    #[error("unsupported format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version found.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// The payload ends before the document does.
    #[error("payload is truncated: {0}")]
    Truncated(DecodeError),
    /// The payload is not an encoding of the document.
    #[error("payload is corrupt: {0}")]
    Corrupt(DecodeError),
    /// Bytes follow the document.
    #[error("{extra} unexpected bytes after the document")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The value could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(#[from] EncodeError),
    /// The document decoded but does not describe a graph.
    #[error(transparent)]
    Doc(#[from] DocError),
}

/// Encodes a document: `magic`, [`FORMAT_VERSION`], then bincode of `value`.
///
/// # Errors
/// [`CodecError::Encode`] when bincode cannot encode `value` (a failing `Serialize`
/// impl or a sequence of unknown length).
pub fn encode<T: Serialize>(magic: [u8; 4], value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let payload = bincode::serde::encode_to_vec(value, config())?;
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a document written by [`encode`] with the same `magic`.
///
/// # Errors
/// [`CodecError::TruncatedHeader`] when `bytes` are shorter than the header,
/// [`CodecError::BadMagic`] for another magic, [`CodecError::UnsupportedVersion`] for
/// another format version, [`CodecError::Truncated`] or [`CodecError::Corrupt`] when the
/// payload is not an encoding of `T`, and [`CodecError::TrailingBytes`] when bytes follow
/// the document.
pub fn decode<T: DeserializeOwned>(magic: [u8; 4], bytes: &[u8]) -> Result<T, CodecError> {
    let (header, payload) = match (bytes.get(..HEADER_LEN), bytes.get(HEADER_LEN..)) {
        (Some(h), Some(p)) => (h, p),
        _ => return Err(CodecError::TruncatedHeader { len: bytes.len() }),
    };
    let found = [header[0], header[1], header[2], header[3]];
    if found != magic {
        return Err(CodecError::BadMagic {
            expected: magic,
            found,
        });
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let (value, read) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|e| match e {
            DecodeError::UnexpectedEnd { .. } => CodecError::Truncated(e),
            e => CodecError::Corrupt(e),
        })?;
    match payload.len().checked_sub(read) {
        Some(0) => Ok(value),
        Some(extra) => Err(CodecError::TrailingBytes { extra }),
        None => Err(CodecError::TrailingBytes { extra: 0 }),
    }
}

/// Encodes a graph (magic [`GRAPH_MAGIC`]).
pub fn encode_graph(g: &Graph) -> Vec<u8> {
    match encode(GRAPH_MAGIC, &GraphDoc::from_graph(g)) {
        Ok(bytes) => bytes,
        // Graph documents hold only sized sequences, strings, numbers and enums.
        Err(e) => unreachable!("graph documents always encode: {e}"),
    }
}

/// Decodes a graph written by [`encode_graph`]. Does not verify.
///
/// # Errors
/// The errors of [`decode`], and [`CodecError::Doc`] when the document does not describe
/// a graph (an input names no tensor, or more ops or tensors than ids can number).
pub fn decode_graph(bytes: &[u8]) -> Result<Graph, CodecError> {
    let doc: GraphDoc = decode(GRAPH_MAGIC, bytes)?;
    Ok(doc.into_graph()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Dim, GraphBuilder, Op, Shape, TensorType};

    fn sample() -> Graph {
        let mut b = GraphBuilder::new("codec");
        let x = b.input(
            "x",
            TensorType::new(DType::Bf16, [Dim::batch(), Dim::lit(64)]),
        );
        let shape = Shape::new([Dim::batch(), Dim::lit(8), Dim::lit(8)]);
        let y = b.add1(Op::Reshape { shape }, &[x]).unwrap();
        b.add1(Op::Scale { factor: -0.1 }, &[y]).unwrap();
        b.finish()
    }

    #[test]
    fn graphs_round_trip_and_bad_headers_are_typed() {
        let g = sample();
        let bytes = encode_graph(&g);
        assert_eq!(&bytes[..4], b"APIR");
        assert_eq!(decode_graph(&bytes).unwrap(), g);
        assert!(matches!(
            decode_graph(&bytes[..3]),
            Err(CodecError::TruncatedHeader { len: 3 })
        ));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode_graph(&bad),
            Err(CodecError::BadMagic { .. })
        ));
        let mut bad = bytes.clone();
        bad[4] = 99;
        assert!(matches!(
            decode_graph(&bad),
            Err(CodecError::UnsupportedVersion { found: 99, .. })
        ));
        assert!(matches!(
            decode_graph(&bytes[..bytes.len() - 1]),
            Err(CodecError::Truncated(_))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            decode_graph(&long),
            Err(CodecError::TrailingBytes { extra: 1 })
        ));
        for cut in 0..bytes.len() {
            assert!(decode_graph(&bytes[..cut]).is_err());
        }
    }
}
