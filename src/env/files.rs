//! Files in and out of a sandbox (`PUT` and `GET /files/{run_id}/{path}`): the operations
//! themselves, run where the files are (inside the sandbox by its agent, on the host for a
//! `local` instance), and how a request for one is worded on the agent wire.
//!
//! A file goes in under a temporary name in its directory and is renamed into place, so a
//! failed upload leaves nothing; a tar is unpacked into a temporary directory beside its
//! target and moved in only once the whole stream unpacked. A directory goes out as a tar
//! stream written by a thread into a pipe, so a download of any size takes bounded memory.

use crate::url::{decode_query, encode_query};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a file operation failed.
#[derive(Debug)]
pub enum FileError {
    /// Nothing at the path (404).
    NotFound(String),
    /// The request cannot be done as asked (400): a path that is a directory for a file, a
    /// bad tar, a bad mode.
    Invalid(String),
    /// The file system failed (500).
    Io { context: String, source: io::Error },
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileError::NotFound(why) | FileError::Invalid(why) => f.write_str(why),
            FileError::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

/// The size of the buffer a file is copied through (the agent's socket and the server's
/// connections pass at most this much per read).
const COPY_BYTES: usize = 256 * 1024;

impl FileError {
    /// The upload's body stopped before its end (the client hung up or stalled, or sent more
    /// than the server takes): the request's fault, and nothing is written.
    pub fn stopped(err: &io::Error) -> FileError {
        FileError::Invalid(format!(
            "the upload stopped before its end ({err}): nothing was written; send it again"
        ))
    }

    /// The HTTP status that says this on the agent wire (and in the API).
    pub fn status(&self) -> u16 {
        match self {
            FileError::NotFound(_) => 404,
            FileError::Invalid(_) => 400,
            FileError::Io { .. } => 500,
        }
    }

    /// An I/O failure at `path`: a missing path is [`FileError::NotFound`], a path through a
    /// file (`ENOTDIR`, or `EEXIST` from making its parents) or onto a directory (`EISDIR`) is
    /// the request's fault, and so is a place the sandbox may not touch (a read-only mount,
    /// `EROFS`; permissions, `EACCES`; an immutable file, `EPERM`), said with what to do.
    fn at(what: &str, path: &Path, source: io::Error) -> FileError {
        let context = format!("cannot {what} {}", path.display());
        match source.raw_os_error() {
            _ if source.kind() == io::ErrorKind::NotFound => {
                FileError::NotFound(format!("{}: no such file or directory", path.display()))
            }
            Some(libc::ENOTDIR | libc::EISDIR | libc::EEXIST | libc::ENAMETOOLONG) => {
                FileError::Invalid(format!("{context}: {source}"))
            }
            Some(libc::EROFS | libc::EACCES | libc::EPERM) => {
                let hint = if matches!(what, "read" | "open" | "list") {
                    "the sandbox's user may not read it"
                } else {
                    "a read-only or protected place: nothing was written; choose a path the \
                     sandbox's user can write, such as under its working directory or /tmp"
                };
                FileError::Invalid(format!("{context}: {source} ({hint})"))
            }
            _ => FileError::Io { context, source },
        }
    }
}

/// One upload, as the API and the agent wire word it.
#[derive(Clone, Debug, PartialEq)]
pub struct Upload {
    /// Absolute by the time it reaches the agent (see [`resolve`]).
    pub path: String,
    /// The file's permission bits (`?mode=0755`); a file upload only.
    pub mode: Option<u32>,
    /// The body is a tar to unpack into the directory `path`.
    pub tar: bool,
}

/// What a download answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// The raw bytes of a file.
    File,
    /// A tar stream of a directory.
    Directory,
}

impl Kind {
    /// The kind a [`KIND_HEADER`] names.
    pub fn of_name(name: &str) -> Option<Kind> {
        [Kind::File, Kind::Directory]
            .into_iter()
            .find(|kind| kind.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Directory => "directory",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Kind::File => "application/octet-stream",
            Kind::Directory => TAR_CONTENT_TYPE,
        }
    }
}

/// The content type of a tar body: an upload unpacks it, a directory's download is one.
pub const TAR_CONTENT_TYPE: &str = "application/x-tar";

/// The header that says what a download is, on the agent wire and in the API.
pub const KIND_HEADER: &str = "X-Arservice-Kind";

/// A download under way: what it is, its length when known (a file's), and its bytes.
pub struct Download {
    pub kind: Kind,
    pub length: Option<u64>,
    pub body: Box<dyn Read + Send>,
}

/// The path a request names, inside the sandbox: a relative one is taken from `base` (the
/// instance's working directory). Refuses what no file system has: an empty path or a NUL.
pub fn resolve(base: &str, path: &str) -> Result<String, FileError> {
    if path.is_empty() {
        return Err(FileError::Invalid("the path is empty".into()));
    }
    if path.contains('\0') {
        return Err(FileError::Invalid("the path contains a NUL byte".into()));
    }
    Ok(Path::new(base).join(path).display().to_string())
}

/// Where a relative path reaching an agent is taken from: its own working directory (the
/// sandbox's, e.g. the image's `WORKDIR`), when the host knows no better.
pub fn here() -> String {
    std::env::current_dir()
        .map(|dir| dir.display().to_string())
        .unwrap_or_else(|_| "/".into())
}

/// Parses `?mode=` (octal, as chmod takes it: `755`, `0755`, `0o755`).
pub fn parse_mode(text: &str) -> Result<u32, FileError> {
    let digits = text.trim_start_matches("0o");
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| {
            FileError::Invalid(format!(
                "mode '{text}' is not an octal permission like 0644 or 0755"
            ))
        })
}

/// A name for something temporary beside `target`, unique in this process.
fn temporary_beside(target: &Path) -> Result<PathBuf, FileError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .ok_or_else(|| FileError::Invalid(format!("{} names no file", target.display())))?;
    let temporary = format!(
        ".{}.arservice-{}-{}.part",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    Ok(target.with_file_name(temporary))
}

/// Writes `body` to the file or (a tar) into the directory `upload.path`, creating its
/// parents; the number of bytes the body had. Nothing is left of a failed upload.
pub fn write(upload: &Upload, body: &mut dyn Read) -> Result<u64, FileError> {
    let target = Path::new(&upload.path);
    if target.components().any(|part| part == Component::ParentDir) {
        return Err(FileError::Invalid(format!(
            "{}: a path with '..' is not taken",
            target.display()
        )));
    }
    let parent = target
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .ok_or_else(|| FileError::Invalid(format!("{} names no file", target.display())))?;
    std::fs::create_dir_all(parent).map_err(|err| match err.raw_os_error() {
        Some(libc::EEXIST | libc::ENOTDIR) => FileError::Invalid(format!(
            "cannot create {}: a part of it is a file, not a directory",
            parent.display()
        )),
        _ => FileError::at("create", parent, err),
    })?;
    if upload.tar {
        if upload.mode.is_some() {
            return Err(FileError::Invalid(
                "mode applies to a file; a tar's entries carry their own".into(),
            ));
        }
        return unpack(target, body);
    }
    if target.is_dir() {
        return Err(FileError::Invalid(format!(
            "{} is a directory: send a tar (Content-Type: {TAR_CONTENT_TYPE}) to unpack into it",
            target.display()
        )));
    }
    let temporary = temporary_beside(target)?;
    let written = write_new(&temporary, parent, upload.mode, body);
    let renamed = written.and_then(|bytes| {
        std::fs::rename(&temporary, target)
            .map(|()| bytes)
            .map_err(|err| FileError::at("rename into", target, err))
    });
    if renamed.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    renamed
}

/// Creates `path` (which must not exist, in the directory `parent`) with `mode` and the
/// body's bytes. A body that fails (the client hung up, or sent too much) is the request's
/// fault; a file that cannot be written is the file system's.
fn write_new(
    path: &Path,
    parent: &Path,
    mode: Option<u32>,
    body: &mut dyn Read,
) -> Result<u64, FileError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode.unwrap_or(0o644))
        .open(path)
        .map_err(|err| FileError::at("create a file in", parent, err))?;
    let mut buffer = vec![0; COPY_BYTES];
    let mut bytes = 0u64;
    loop {
        let read = match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(FileError::stopped(&err)),
        };
        file.write_all(&buffer[..read])
            .map_err(|err| FileError::at("write", path, err))?;
        bytes += read as u64;
    }
    if let Some(mode) = mode {
        // Exactly the mode asked, whatever the umask.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|err| FileError::at("set the mode of", path, err))?;
    }
    Ok(bytes)
}

/// Unpacks the tar `body` into the directory `target` (created if missing, merged into if
/// there): into a temporary directory first, then moved in.
fn unpack(target: &Path, body: &mut dyn Read) -> Result<u64, FileError> {
    if target.exists() && !target.is_dir() {
        return Err(FileError::Invalid(format!(
            "{} is not a directory: a tar unpacks into a directory",
            target.display()
        )));
    }
    let staging = temporary_beside(target)?;
    let mut counted = Counted {
        inner: body,
        bytes: 0,
    };
    let unpacked = std::fs::create_dir(&staging)
        .map_err(|err| FileError::at("create a directory beside", target, err))
        .and_then(|()| unpack_into(&staging, &mut counted))
        // The zero blocks after a tar's end are part of the body too.
        .and_then(|()| {
            io::copy(&mut counted, &mut io::sink())
                .map(drop)
                .map_err(|err| FileError::stopped(&err))
        })
        .and_then(|()| move_in(&staging, target));
    let _ = std::fs::remove_dir_all(&staging);
    unpacked.map(|()| counted.bytes)
}

/// Every entry of the tar into `dir`; an entry that would land outside it is refused.
fn unpack_into(dir: &Path, body: &mut dyn Read) -> Result<(), FileError> {
    let bad = |why: String| FileError::Invalid(format!("not a tar this server unpacks: {why}"));
    let mut archive = tar::Archive::new(body);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    let entries = archive.entries().map_err(|err| bad(err.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|err| bad(err.to_string()))?;
        let path = entry
            .path()
            .map_err(|err| bad(err.to_string()))?
            .into_owned();
        let leaves = path
            .components()
            .any(|part| matches!(part, Component::ParentDir | Component::RootDir));
        if leaves {
            return Err(bad(format!(
                "the entry {} would leave the directory",
                path.display()
            )));
        }
        use tar::EntryType;
        match entry.header().entry_type() {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::GNUSparse => {}
            other => {
                return Err(bad(format!(
                    "the entry {} is a {other:?}, not a file, directory or link",
                    path.display()
                )))
            }
        }
        let inside = entry.unpack_in(dir).map_err(|err| bad(err.to_string()))?;
        if !inside {
            return Err(bad(format!(
                "the entry {} would leave the directory",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Moves what `staging` holds into `target`: the whole directory when `target` is new, else
/// entry by entry (a directory merged into one of the same name, anything else replacing
/// what was there).
fn move_in(staging: &Path, target: &Path) -> Result<(), FileError> {
    if !target.exists() {
        return std::fs::rename(staging, target)
            .map_err(|err| FileError::at("rename into", target, err));
    }
    let listing = std::fs::read_dir(staging).map_err(|err| FileError::at("list", staging, err))?;
    for entry in listing {
        let entry = entry.map_err(|err| FileError::at("list", staging, err))?;
        let (from, to) = (entry.path(), target.join(entry.file_name()));
        let from_is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
        let to_is_dir = std::fs::symlink_metadata(&to).is_ok_and(|meta| meta.is_dir());
        if from_is_dir && to_is_dir {
            move_in(&from, &to)?;
        } else {
            if to_is_dir {
                std::fs::remove_dir_all(&to).map_err(|err| FileError::at("replace", &to, err))?;
            }
            std::fs::rename(&from, &to).map_err(|err| FileError::at("rename into", &to, err))?;
        }
    }
    Ok(())
}

/// A reader that counts what went through it.
struct Counted<'a> {
    inner: &'a mut dyn Read,
    bytes: u64,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.bytes += read as u64;
        Ok(read)
    }
}

/// Opens `path` for a download: a file's bytes, or a directory as a tar stream (written by a
/// thread into a pipe as it is read: bounded memory, whatever the size).
pub fn read(path: &str) -> Result<Download, FileError> {
    let target = Path::new(path);
    let meta = std::fs::metadata(target).map_err(|err| FileError::at("read", target, err))?;
    if meta.is_file() {
        let file = std::fs::File::open(target).map_err(|err| FileError::at("open", target, err))?;
        return Ok(Download {
            kind: Kind::File,
            length: Some(meta.len()),
            // What the length said, even if the file grows while it is read.
            body: Box::new(file.take(meta.len())),
        });
    }
    if !meta.is_dir() {
        return Err(FileError::Invalid(format!(
            "{} is neither a file nor a directory",
            target.display()
        )));
    }
    // The directory must be readable now, so that its failure is an answer, not a cut stream.
    std::fs::read_dir(target).map_err(|err| FileError::at("list", target, err))?;
    let (reader, writer) = io::pipe().map_err(|err| FileError::Io {
        context: "cannot make a pipe".into(),
        source: err,
    })?;
    let (outcome, told) = std::sync::mpsc::sync_channel(1);
    let root = target.to_path_buf();
    std::thread::Builder::new()
        .name("tar".into())
        .spawn(move || {
            let mut builder = tar::Builder::new(writer);
            builder.follow_symlinks(false);
            let written = builder
                .append_dir_all(".", &root)
                .and_then(|()| builder.finish());
            // The pipe closes (the builder ends the archive as it goes) before the word.
            drop(builder);
            // A reader that went away (the client hung up) is not worth a word.
            if let Err(err) = &written {
                if err.kind() != io::ErrorKind::BrokenPipe {
                    log::warn!("the tar of {} stopped: {err}", root.display());
                }
            }
            let _ = outcome.send(written.map_err(|err| err.to_string()));
        })
        .map_err(|err| FileError::Io {
            context: "cannot start the tar writer".into(),
            source: err,
        })?;
    Ok(Download {
        kind: Kind::Directory,
        length: None,
        body: Box::new(TarStream { pipe: reader, told }),
    })
}

/// The read end of a directory's tar: the pipe's end is the stream's end only if the writer
/// finished. One that failed (a file it could not read, an entry gone under it) makes the last
/// read an error, so that the download is cut (its client sees an unfinished stream) rather
/// than ended as if it were whole.
struct TarStream {
    pipe: io::PipeReader,
    told: std::sync::mpsc::Receiver<Result<(), String>>,
}

impl Read for TarStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.pipe.read(buf)?;
        if read > 0 || buf.is_empty() {
            return Ok(read);
        }
        match self.told.recv() {
            Ok(Ok(())) => Ok(0),
            Ok(Err(why)) => Err(io::Error::other(format!("the tar stopped: {why}"))),
            Err(_) => Err(io::Error::other("the tar writer ended without a word")),
        }
    }
}

impl Upload {
    /// The query string that carries this upload to an agent.
    pub fn query(&self) -> String {
        let mut query = format!("path={}", encode_query(&self.path));
        if let Some(mode) = self.mode {
            query.push_str(&format!("&mode={mode:o}"));
        }
        if self.tar {
            query.push_str("&tar=1");
        }
        query
    }

    /// The upload an agent's query string carries.
    pub fn from_query(query: &str) -> Result<Upload, FileError> {
        let pairs = decode_query(query);
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(name, _)| name == key)
                .map(|(_, value)| value.as_str())
        };
        let path = get("path").ok_or_else(|| FileError::Invalid("no path".into()))?;
        Ok(Upload {
            path: resolve(&here(), path)?,
            mode: get("mode").map(parse_mode).transpose()?,
            tar: get("tar") == Some("1"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ars-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn upload(path: &Path, mode: Option<u32>, tar: bool) -> Upload {
        Upload {
            path: path.display().to_string(),
            mode,
            tar,
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        let mut names = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(at) = stack.pop() {
            for entry in std::fs::read_dir(&at).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains(".arservice-") {
                    names.push(name);
                }
                if entry.file_type().unwrap().is_dir() {
                    stack.push(entry.path());
                }
            }
        }
        names
    }

    #[test]
    fn a_file_goes_in_with_its_parents_and_mode_and_comes_out_the_same() {
        let dir = temp("file");
        let path = dir.join("a/b/c.bin");
        let bytes: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        let written = write(&upload(&path, Some(0o755), false), &mut &bytes[..]).unwrap();
        assert_eq!(written, bytes.len() as u64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        let mut download = read(&path.display().to_string()).unwrap();
        assert_eq!(
            (download.kind, download.length),
            (Kind::File, Some(300_000))
        );
        let mut back = Vec::new();
        download.body.read_to_end(&mut back).unwrap();
        assert_eq!(back, bytes);
        // Replaced whole; no temporary left.
        write(&upload(&path, None, false), &mut &b"new"[..]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A body that fails after some bytes, as a client that hangs up.
    struct Failing(usize);

    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "hung up"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(b'x');
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_failed_upload_leaves_nothing_and_the_old_file_untouched() {
        let dir = temp("failed");
        let path = dir.join("kept.txt");
        std::fs::write(&path, b"old").unwrap();
        let err = write(&upload(&path, None, false), &mut Failing(100_000)).unwrap_err();
        assert_eq!(err.status(), 400, "{err}");
        assert!(err.to_string().contains("stopped before its end"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let err = write(&upload(&dir.join("new"), None, true), &mut Failing(5000)).unwrap_err();
        assert_eq!(err.status(), 400, "{err}");
        assert!(!dir.join("new").exists());
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refusals_say_why_with_their_status() {
        let dir = temp("refusals");
        std::fs::write(dir.join("file"), b"x").unwrap();
        let cases: Vec<(Upload, u16)> = vec![
            (upload(&dir, None, false), 400), // a directory, no tar
            (upload(&dir.join("file/below"), None, false), 400), // through a file
            (upload(&dir.join("file"), None, true), 400), // a tar onto a file
            (upload(&dir.join("x"), Some(0o644), true), 400), // mode with a tar
            (upload(&dir.join("../escape"), None, false), 400), // '..'
        ];
        for (upload, status) in cases {
            let err = write(&upload, &mut &b""[..]).unwrap_err();
            assert_eq!(err.status(), status, "{upload:?}: {err}");
        }
        assert_eq!(
            read(&dir.join("missing").display().to_string())
                .err()
                .unwrap()
                .status(),
            404
        );
        assert_eq!(parse_mode("0755").unwrap(), 0o755);
        assert_eq!(parse_mode("0o600").unwrap(), 0o600);
        assert!(
            parse_mode("9").is_err() && parse_mode("-1").is_err() && parse_mode("77777").is_err()
        );
        // A place no user may write (sysfs takes no new files, even from root).
        for path in ["/sys/arservice-unit.txt", "/sys/arservice-unit/below.txt"] {
            let err = write(&upload(Path::new(path), None, false), &mut &b"x"[..]).unwrap_err();
            assert_eq!(err.status(), 400, "{path}: {err}");
            assert!(err.to_string().contains("nothing was written"), "{err}");
        }
        assert!(resolve("/w", "").is_err() && resolve("/w", "a\0b").is_err());
        assert_eq!(resolve("/w", "a/b").unwrap(), "/w/a/b");
        assert_eq!(resolve("/w", "/etc/x").unwrap(), "/etc/x");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tar_whose_writer_failed_ends_in_an_error_not_an_end() {
        for (outcome, whole) in [(Ok(()), true), (Err("a file vanished".to_string()), false)] {
            let (pipe, mut writer) = io::pipe().unwrap();
            let (tell, told) = std::sync::mpsc::sync_channel(1);
            use std::io::Write;
            writer.write_all(b"some of it").unwrap();
            drop(writer);
            tell.send(outcome).unwrap();
            let mut stream = TarStream { pipe, told };
            let mut got = Vec::new();
            let read = stream.read_to_end(&mut got);
            assert_eq!(got, b"some of it");
            assert_eq!(read.is_ok(), whole, "{read:?}");
        }
    }

    #[test]
    fn a_directory_goes_out_as_a_tar_and_back_in_merged() {
        let dir = temp("tar");
        let source = dir.join("src");
        std::fs::create_dir_all(source.join("sub/deeper")).unwrap();
        std::fs::write(source.join("top.txt"), b"top").unwrap();
        std::fs::write(source.join("sub/deeper/big.bin"), vec![7u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink("top.txt", source.join("link")).unwrap();
        let mut download = read(&source.display().to_string()).unwrap();
        assert_eq!((download.kind, download.length), (Kind::Directory, None));
        let mut tar_bytes = Vec::new();
        download.body.read_to_end(&mut tar_bytes).unwrap();
        let target = dir.join("dst");
        std::fs::create_dir_all(target.join("sub")).unwrap();
        std::fs::write(target.join("sub/kept.txt"), b"kept").unwrap();
        std::fs::write(target.join("top.txt"), b"replaced").unwrap();
        let bytes = write(&upload(&target, None, true), &mut &tar_bytes[..]).unwrap();
        assert_eq!(bytes, tar_bytes.len() as u64);
        assert_eq!(std::fs::read(target.join("top.txt")).unwrap(), b"top");
        assert_eq!(std::fs::read(target.join("sub/kept.txt")).unwrap(), b"kept");
        assert_eq!(
            std::fs::read(target.join("sub/deeper/big.bin"))
                .unwrap()
                .len(),
            1 << 20
        );
        assert_eq!(
            std::fs::read_link(target.join("link")).unwrap(),
            Path::new("top.txt")
        );
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tar_entry_that_would_leave_its_directory_is_refused_and_nothing_lands() {
        let dir = temp("escape");
        for name in ["../outside.txt", "/abs.txt"] {
            let mut header = tar::Header::new_gnu();
            header.set_size(1);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            // set_path refuses '..': write the name bytes as a hostile client would.
            let raw = header.as_old_mut();
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            let mut bytes = header.as_bytes().to_vec();
            bytes.extend_from_slice(&[b'x'; 512]);
            bytes.extend_from_slice(&[0; 1024]);
            let err = write(&upload(&dir.join("in"), None, true), &mut &bytes[..]).unwrap_err();
            assert_eq!(err.status(), 400, "{name}: {err}");
            assert!(err.to_string().contains("leave"), "{err}");
        }
        assert!(!dir.join("outside.txt").exists() && !dir.join("in").exists());
        assert!(leftovers(&dir).is_empty());
        let pairs = decode_query("path=a%2Fb%20c+d&mode=0755&tar=1");
        assert_eq!(pairs[0], ("path".into(), "a/b c d".into()));
        let upload = Upload::from_query(
            &Upload {
                path: "/w/ü x&y=z".into(),
                mode: Some(0o755),
                tar: true,
            }
            .query(),
        )
        .unwrap();
        assert_eq!(upload.path, "/w/ü x&y=z");
        assert_eq!((upload.mode, upload.tar), (Some(0o755), true));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
