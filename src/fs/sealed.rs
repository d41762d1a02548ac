//! Small state files sealed with a checksum, and setting damaged ones aside.
//!
//! A sealed file is one header line, `<magic><crc32 of the body, 8 lower-case hex
//! digits>\n`, then the body. A file that fails the check is renamed
//! `<name>.corrupt` (or `.corrupt.1`, `.corrupt.2`, ... so an earlier copy is never
//! overwritten) for an operator to inspect, and the caller starts from an empty state.

use std::path::{Path, PathBuf};

use crate::fs::Fs;

/// `body` with its header line.
pub fn seal(magic: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{magic}{:08x}\n", crc32fast::hash(body)).into_bytes();
    out.extend_from_slice(body);
    out
}

/// The body of a sealed file, or why it is not one.
pub fn unseal<'a>(magic: &str, bytes: &'a [u8]) -> Result<&'a [u8], String> {
    let nl = memchr::memchr(b'\n', bytes).ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not text")?;
    let crc_hex = header.strip_prefix(magic).ok_or("bad header")?;
    // Exactly what `seal` writes: an upper-case digit is a flipped bit too.
    if crc_hex.len() != 8
        || !crc_hex
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err("bad checksum field".into());
    }
    let crc = u32::from_str_radix(crc_hex, 16).map_err(|_| "bad checksum field")?;
    let body = &bytes[nl + 1..];
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(body)
}

/// Rename a damaged `path` to the first free `<name>.corrupt[.N]` beside it; where it
/// went, or `None` if it could not be moved (the next write replaces it then).
pub fn set_aside(fs: &dyn Fs, path: &Path) -> Option<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let taken = fs.list_dir(dir).unwrap_or_default();
    let aside = (0u32..1000)
        .map(|i| match i {
            0 => format!("{name}.corrupt"),
            i => format!("{name}.corrupt.{i}"),
        })
        .find(|n| !taken.contains(n))
        .map(|n| dir.join(n));
    aside.filter(|a| fs.rename(path, a).is_ok() && fs.sync_dir(dir).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flipped_bit_of_a_sealed_file_is_caught() {
        let sealed = seal("soclink-test v1 crc32=", br#"{"a":1,"b":"two"}"#);
        assert_eq!(
            unseal("soclink-test v1 crc32=", &sealed).unwrap(),
            br#"{"a":1,"b":"two"}"#
        );
        for i in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(unseal("soclink-test v1 crc32=", &bad).is_err(), "bit {i}");
        }
        for len in 0..sealed.len() {
            assert!(unseal("soclink-test v1 crc32=", &sealed[..len]).is_err());
        }
    }
}
