//! Reading the user's input files (models, clusters, calibrations, runs, saved plans)
//! with a size bound, so that a mistyped path to a device or a huge file is an error,
//! not a process that reads until memory runs out.

use std::io::Read;
use std::path::Path;

/// The largest input file apar reads: 512 MiB. Its inputs are configuration and
/// graph files of kilobytes to a few megabytes; a saved plan with its simulated trace
/// of a large job is tens of megabytes.
pub const MAX_INPUT_BYTES: u64 = 512 << 20;

/// The bytes of the file at `path`.
///
/// # Errors
///
/// The file's I/O error, or [`std::io::ErrorKind::InvalidData`] when it holds more than [`MAX_INPUT_BYTES`]
/// (a device such as `/dev/zero` included, which is read up to the bound).
pub(crate) fn read_bytes(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let too_large = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "larger than the {} MiB apar reads from an input file",
                MAX_INPUT_BYTES >> 20
            ),
        )
    };
    if file
        .metadata()
        .is_ok_and(|m| m.is_file() && m.len() > MAX_INPUT_BYTES)
    {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(MAX_INPUT_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// The text of the file at `path`, as [`read_bytes`].
///
/// # Errors
///
/// As [`read_bytes`], and [`std::io::ErrorKind::InvalidData`] when it is not UTF-8.
pub(crate) fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_bytes(path)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}
