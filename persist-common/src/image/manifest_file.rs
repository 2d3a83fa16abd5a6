//! The `manifest` file: its header line, the JSON of the manifest and,
//! from format 7 on, the binary section of its mappings
//! (`mapping_codec.rs`).
//!
//! Format 7: `persist-image 7 <json len> <crc> <binary len>\n`, the JSON
//! (every `mappings` list empty), then the binary section; the CRC32C
//! covers both. Formats 1 to 6: `persist-image <version> <len> <crc>\n`
//! and the JSON alone, mappings included; they are still read.

use std::path::Path;

use super::io::check_layout;
use super::mapping_codec::{MappingReader, encode_mappings};
use super::{FORMAT_VERSION, ImageError, Manifest, OLDEST_READABLE_VERSION, base_store_file};

/// Longest JSON, and longest binary section, accepted: a hostile header
/// cannot make us allocate without bound.
pub(super) const MAX_MANIFEST_BYTES: usize = 256 << 20;

/// Longest header line accepted, its newline excluded.
pub(super) const MAX_HEADER_BYTES: usize = 64;

/// The first format whose mappings are in a binary section.
const BINARY_MAPPINGS_VERSION: u32 = 7;

/// The bytes of a manifest file holding `manifest`, in the current format.
pub fn encode_manifest(manifest: &mut Manifest) -> Result<Vec<u8>, serde_json::Error> {
    // Taken out for the JSON, put back whatever it gives.
    let root = std::mem::take(&mut manifest.mappings);
    let children: Vec<_> = manifest
        .children
        .iter_mut()
        .map(|child| std::mem::take(&mut child.mappings))
        .collect();
    let json = serde_json::to_vec(manifest);
    manifest.mappings = root;
    for (child, mappings) in manifest.children.iter_mut().zip(children) {
        child.mappings = mappings;
    }
    let json = json?;
    let mut binary = Vec::new();
    encode_mappings(&manifest.mappings, &mut binary);
    for child in &manifest.children {
        encode_mappings(&child.mappings, &mut binary);
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&json), &binary);
    let mut file = format!(
        "persist-image {FORMAT_VERSION} {} {crc:08x} {}\n",
        json.len(),
        binary.len()
    )
    .into_bytes();
    file.extend_from_slice(&json);
    file.extend_from_slice(&binary);
    Ok(file)
}

/// Decodes and checks the contents of a manifest file, `path` naming it in
/// errors: the header line, the lengths and checksum of what follows, the
/// JSON and the mappings, the base stores' names and the layout of mappings
/// and page runs (as far as the manifest alone can tell; [`super::Image::open`]
/// checks the page stores' sizes).
pub fn decode_manifest(bytes: &[u8], path: &Path) -> Result<Manifest, ImageError> {
    decode_with_crc(bytes, path).map(|(manifest, _)| manifest)
}

/// [`decode_manifest`], and the checksum its header gives: the image's
/// identity ([`super::manifest_crc`]).
pub(super) fn decode_with_crc(bytes: &[u8], path: &Path) -> Result<(Manifest, u32), ImageError> {
    let bad = |reason: &str| ImageError::BadHeader {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let inconsistent = |reason: String| ImageError::Inconsistent {
        path: path.to_owned(),
        reason,
    };
    let header_end = bytes
        .iter()
        .take(MAX_HEADER_BYTES + 1)
        .position(|&byte| byte == b'\n')
        .ok_or_else(|| bad("no header line"))?;
    let (head, body) = (&bytes[..header_end], &bytes[header_end + 1..]);
    let head = std::str::from_utf8(head).map_err(|_| bad("header is not text"))?;
    let fields: Vec<&str> = head.split(' ').collect();
    let (magic, version) = match fields[..] {
        [magic, version, ..] => (magic, version),
        _ => return Err(bad("expected `persist-image VERSION LEN CRC`")),
    };
    if magic != "persist-image" {
        return Err(bad("missing `persist-image` magic"));
    }
    let version: u32 = version
        .parse()
        .map_err(|_| bad("version is not a number"))?;
    if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(ImageError::Version {
            path: path.to_owned(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let binary_mappings = version >= BINARY_MAPPINGS_VERSION;
    let (len, crc, binary_len) = match (binary_mappings, &fields[2..]) {
        (false, &[len, crc]) => (len, crc, "0"),
        (true, &[len, crc, binary_len]) => (len, crc, binary_len),
        (false, _) => return Err(bad("expected `persist-image VERSION LEN CRC`")),
        (true, _) => return Err(bad("expected `persist-image VERSION LEN CRC BINARY-LEN`")),
    };
    let len: usize = len.parse().map_err(|_| bad("length is not a number"))?;
    let binary_len: usize = binary_len
        .parse()
        .map_err(|_| bad("binary length is not a number"))?;
    if len > MAX_MANIFEST_BYTES || binary_len > MAX_MANIFEST_BYTES {
        return Err(bad("manifest length is implausibly large"));
    }
    let crc = u32::from_str_radix(crc, 16).map_err(|_| bad("checksum is not hex"))?;
    if body.len() != len + binary_len {
        return Err(inconsistent(format!(
            "manifest holds {} bytes, header says {}: truncated?",
            body.len(),
            len + binary_len
        )));
    }
    if crc32c::crc32c(body) != crc {
        return Err(ImageError::Checksum {
            path: path.to_owned(),
            what: "the manifest".into(),
        });
    }
    let (json, binary) = body.split_at(len);
    let mut manifest: Manifest =
        serde_json::from_slice(json).map_err(|source| ImageError::Json {
            path: path.to_owned(),
            source,
        })?;
    if binary_mappings {
        read_binary_mappings(&mut manifest, binary).map_err(inconsistent)?;
    }
    for (index, base) in manifest.base_stores.iter().enumerate() {
        // An exact name keeps a hostile manifest from naming files
        // outside the image.
        if base.file != base_store_file(index) {
            return Err(inconsistent(format!(
                "base store {index} is named {:?}, expected {:?}",
                base.file,
                base_store_file(index)
            )));
        }
    }
    check_layout(&manifest, path)?;
    Ok((manifest, crc))
}

/// Fills the mappings of `manifest` and of its children from `binary`.
fn read_binary_mappings(manifest: &mut Manifest, binary: &[u8]) -> Result<(), String> {
    let in_json = !manifest.mappings.is_empty()
        || manifest
            .children
            .iter()
            .any(|child| !child.mappings.is_empty());
    if in_json {
        return Err("mappings in the JSON of a format with a mapping section".into());
    }
    let mut reader = MappingReader::new(binary);
    manifest.mappings = reader.next_list().map_err(|err| err.to_string())?;
    for child in &mut manifest.children {
        child.mappings = reader.next_list().map_err(|err| err.to_string())?;
    }
    reader.finish().map_err(|err| err.to_string())
}

/// The manifest of a file written by [`encode_manifest`], read without any
/// check, as a hostile or buggy writer's tests start from.
#[cfg(test)]
pub(super) fn decode_unchecked(bytes: &[u8]) -> Manifest {
    let header_end = bytes.iter().position(|&byte| byte == b'\n').unwrap();
    let head = std::str::from_utf8(&bytes[..header_end]).unwrap();
    let len: usize = head.split(' ').nth(2).unwrap().parse().unwrap();
    let (json, binary) = bytes[header_end + 1..].split_at(len);
    let mut manifest: Manifest = serde_json::from_slice(json).unwrap();
    let mut reader = MappingReader::new(binary);
    manifest.mappings = reader.next_list().unwrap();
    for child in &mut manifest.children {
        child.mappings = reader.next_list().unwrap();
    }
    manifest
}

/// A manifest file of format `version` (before 7): its mappings in the JSON.
#[cfg(test)]
pub(super) fn encode_legacy(manifest: &Manifest, version: u32) -> Vec<u8> {
    assert!(version < BINARY_MAPPINGS_VERSION);
    let json = serde_json::to_vec(manifest).unwrap();
    let mut bytes = format!(
        "persist-image {version} {} {:08x}\n",
        json.len(),
        crc32c::crc32c(&json)
    )
    .into_bytes();
    bytes.extend_from_slice(&json);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ChildProcess, Mapping, PageRun};

    fn tree_manifest() -> Manifest {
        let run = |store_offset| PageRun {
            first_page: 0,
            count: 1,
            store_offset,
            crc32c: 7,
        };
        let child = ChildProcess {
            mappings: vec![Mapping::anonymous(0x20000, 2, vec![run(4096)])],
            ..ChildProcess::default()
        };
        Manifest {
            mappings: vec![
                Mapping::anonymous(0x10000, 1, vec![run(0)]),
                Mapping::anonymous(0x30000, 4, Vec::new()),
            ],
            children: vec![child],
            page_store_bytes: 8192,
            ..Manifest::default()
        }
    }

    #[test]
    fn a_tree_reads_back_and_its_mappings_are_not_in_the_json() {
        let mut manifest = tree_manifest();
        let bytes = encode_manifest(&mut manifest).unwrap();
        assert_eq!(
            manifest,
            tree_manifest(),
            "the manifest is given back whole"
        );
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with(&format!("persist-image {FORMAT_VERSION} ")));
        assert!(text.contains(r#""mappings":[]"#), "{text}");
        assert_eq!(decode_manifest(&bytes, Path::new("m")).unwrap(), manifest);
    }

    #[test]
    fn a_format_6_manifest_with_its_mappings_in_json_still_reads() {
        let manifest = tree_manifest();
        let bytes = encode_legacy(&manifest, 6);
        assert_eq!(decode_manifest(&bytes, Path::new("m")).unwrap(), manifest);
    }

    #[test]
    fn refuses_damaged_sections_and_headers() {
        let mut manifest = tree_manifest();
        let good = encode_manifest(&mut manifest).unwrap();
        let header_end = good.iter().position(|&b| b == b'\n').unwrap();
        let head = std::str::from_utf8(&good[..header_end]).unwrap().to_owned();
        let fields: Vec<&str> = head.split(' ').collect();
        let reseal = |json: &[u8], binary: &[u8], extra: &str| {
            let crc = crc32c::crc32c_append(crc32c::crc32c(json), binary);
            let mut bytes = format!(
                "persist-image {FORMAT_VERSION} {} {crc:08x} {}{extra}\n",
                json.len(),
                binary.len()
            )
            .into_bytes();
            bytes.extend_from_slice(json);
            bytes.extend_from_slice(binary);
            bytes
        };
        let len: usize = fields[2].parse().unwrap();
        let (json, binary) = good[header_end + 1..].split_at(len);

        let cases = [
            (good[..good.len() - 1].to_vec(), "truncated?"),
            (
                reseal(json, &binary[..binary.len() - 1], ""),
                "mapping section",
            ),
            (reseal(json, &[binary, &[0]].concat(), ""), "1 bytes follow"),
            (reseal(json, binary, " 5"), "BINARY-LEN"),
            (
                reseal(&serde_json::to_vec(&tree_manifest()).unwrap(), binary, ""),
                "mappings in the JSON",
            ),
        ];
        for (bytes, expected) in cases {
            let err = decode_manifest(&bytes, Path::new("m")).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let err = decode_manifest(&flipped, Path::new("m")).unwrap_err();
        assert!(matches!(err, ImageError::Checksum { .. }), "{err}");
    }
}
