//! Images: the reference grammar a docker or podman image must follow, the check every
//! kind's image passes (never an option, never a control character), and the cache of
//! converted images (one lock per cached image, a stable hash for its file name).

use super::EnvError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

/// The image reaches a CLI as an argument: one that starts with `-` would be read as an
/// option, so it is refused for every kind, as are control characters (a path with spaces is
/// fine: it is one argument). Docker and podman images must also be references
/// (`[host[:port]/]name[:tag][@digest]`), so that a typo answers 400 here rather than 500
/// from `docker run`: `reference` says the image must be one.
pub fn check_image(image: &str, reference: bool) -> Result<(), String> {
    if image.starts_with('-') || image.chars().any(char::is_control) {
        return Err(format!(
            "image '{}' must not start with '-' or contain control characters",
            image.escape_debug()
        ));
    }
    if reference && !is_image_reference(image) {
        return Err(format!(
            "image '{image}' is not a valid image reference: expected [host[:port]/]name[:tag][@sha256:digest], \
             name in lowercase letters, digits and . _ - separators (like python:3.12-slim)"
        ));
    }
    Ok(())
}

/// Docker's reference grammar, slightly simplified: `[host[:port]/]path[:tag][@algo:hex]`.
fn is_image_reference(image: &str) -> bool {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    let digest_ok = digest.is_none_or(|digest| {
        digest.split_once(':').is_some_and(|(algo, hex)| {
            !algo.is_empty()
                && algo
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && hex.len() >= 32
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        })
    });
    let last_slash = name.rfind('/').map_or(0, |at| at + 1);
    let (path, tag) = match name[last_slash..].rfind(':') {
        Some(at) => (&name[..last_slash + at], Some(&name[last_slash + at + 1..])),
        None => (name, None),
    };
    let tag_ok = tag.is_none_or(|tag| {
        tag.len() <= 128
            && tag
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    });
    let mut components: Vec<&str> = path.split('/').collect();
    let first = components[0];
    let has_host = components.len() > 1
        && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_host {
        let (host, port) = first.split_once(':').unwrap_or((first, ""));
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
        if !host_ok || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        components.remove(0);
    }
    let component_ok = |component: &str| {
        let bytes = component.as_bytes();
        !bytes.is_empty()
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes.iter().all(|&b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
    };
    digest_ok && tag_ok && path.len() <= 255 && components.into_iter().all(component_ok)
}

/// Locks per cached image, so one image is converted once even when many instances of it
/// start together (different images convert in parallel).
static CACHE_LOCKS: LazyLock<parking_lot::Mutex<BTreeMap<PathBuf, Arc<parking_lot::Mutex<()>>>>> =
    LazyLock::new(Default::default);

/// The cached conversion of `source` at `<cache_dir>/<kind>/<hash>.<extension>`, made by
/// `convert(temporary_path)` the first time (then renamed into place, so a crash never leaves a
/// half-written image that looks complete).
pub fn cached_image(
    cache_dir: &Path,
    kind: &str,
    extension: &str,
    source: &str,
    convert: impl FnOnce(&Path) -> Result<(), EnvError>,
) -> Result<PathBuf, EnvError> {
    let dir = cache_dir.join(kind);
    std::fs::create_dir_all(&dir).map_err(|source| EnvError::Io {
        context: format!("cannot create the image cache {}", dir.display()),
        source,
    })?;
    let path = dir.join(format!("{:016x}.{extension}", fnv1a(source.as_bytes())));
    let lock = Arc::clone(CACHE_LOCKS.lock().entry(path.clone()).or_default());
    let _converting = lock.lock();
    if path.exists() {
        return Ok(path);
    }
    let partial = path.with_extension(format!("{extension}.partial"));
    let _ = std::fs::remove_file(&partial);
    convert(&partial)?;
    std::fs::rename(&partial, &path).map_err(|source| EnvError::Io {
        context: format!("cannot move the converted image to {}", path.display()),
        source,
    })?;
    Ok(path)
}

/// The image file `image` names when it ends in `.{extension}` (a file the runtime reads
/// as it is, such as a SIF or a squashfs): `Some(path)` when it is a file here, an error when
/// it is not; `None` when `image` names no such file (it is then built or imported).
pub fn image_file(image: &str, extension: &str, what: &str) -> Option<Result<PathBuf, EnvError>> {
    if !image.ends_with(&format!(".{extension}")) {
        return None;
    }
    let file = PathBuf::from(image);
    Some(if file.is_file() {
        Ok(file)
    } else {
        Err(EnvError::Invalid(format!(
            "image '{image}' is not a {what} file here"
        )))
    })
}

/// FNV-1a: a stable, dependency-free hash for cache file names and server ids.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_file_is_taken_as_it_is_or_refused_when_it_is_missing() {
        let dir = std::env::temp_dir().join(format!("ars-image-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sif = dir.join("here.sif");
        std::fs::write(&sif, b"sif").unwrap();
        let here = sif.to_str().unwrap();
        assert_eq!(image_file(here, "sif", "SIF").unwrap().unwrap(), sif);
        let missing = dir.join("gone.sqsh");
        match image_file(missing.to_str().unwrap(), "sqsh", "squashfs") {
            Some(Err(EnvError::Invalid(message))) => {
                assert!(message.contains("is not a squashfs file here"), "{message}")
            }
            other => panic!("a missing image file was not refused: {other:?}"),
        }
        assert!(image_file("docker://busybox:1", "sif", "SIF").is_none());
        assert!(image_file(here, "sqsh", "squashfs").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn image_references() {
        for good in [
            "busybox",
            "arservice-test/busybox:latest",
            "python:3.12-slim",
            "ghcr.io/org/repo/image:v1.0_rc-2",
            "localhost:5000/x",
            "sweb.eval.x86_64.django__django-11099:latest",
            "docker.io/library/ubuntu@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(is_image_reference(good), "{good}");
            assert!(check_image(good, true).is_ok(), "{good}");
        }
        for bad in [
            ".",
            "",
            "-x",
            "--privileged",
            "Upper/case",
            "a//b",
            "a:",
            "a:-tag",
            "a b",
            "/abs",
            "a/",
            "a@sha256:zz",
            "host:port/x:1",
            "_a",
        ] {
            assert!(
                !is_image_reference(bad) || check_image(bad, true).is_err(),
                "{bad}"
            );
        }
        // Other kinds take paths and URIs, but never an option or a space.
        assert!(check_image("docker://python:3.12", false).is_ok());
        assert!(check_image("/var/lib/rootfs", false).is_ok());
        assert!(check_image("--bind=/:/host", false).is_err());
        assert!(check_image("a\nb", false).is_err());
        assert!(check_image("/srv/root fs", false).is_ok());
        assert!(check_image("a b", true).is_err());
    }
}
