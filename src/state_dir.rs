//! The state dir: a directory only this server's user can reach, proven to be arservice's
//! before anything in it is touched.
//!
//! Owns where the default state dir is, the checks that make a directory trustworthy (every
//! ancestor writable only by root or this user, the directory itself this user's and private,
//! and the marker file that says arservice made it), the lock that keeps two servers apart,
//! and the private directories and files inside it. It never deletes anything: a directory
//! that fails a check is refused as it is, with a message that says what to do.
//!
//! Nothing here follows a symbolic link. Entries are looked at with `lstat`, opened with
//! `O_NOFOLLOW` and changed through their descriptors (`fchmod`), and walks below a directory
//! go from descriptor to descriptor (`openat`), so a link planted at any moment is refused,
//! never followed. Once the state dir and its ancestors are checked, no other user can change
//! what is in them; only this server's own sandboxes can (in the directories bound into them),
//! which is why the walks inside instance directories are descriptor-based too.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The file that proves a directory is a state dir arservice made.
pub const MARKER: &str = ".arservice-state";

/// What the marker says to a person who finds it.
const MARKER_TEXT: &str = "This directory is the state dir of an arservice server: its \
instance directories, journal and lock. arservice made it and uses only directories that \
have this file.\n";

/// The directories of a state dir, each private (0700).
const SUBDIRS: [&str; 3] = ["instances", "journal", "agents"];

/// Mode bits that let others than the owner change a directory's entries.
const WRITABLE_BY_OTHERS: u32 = 0o022;

/// The sticky bit: in a directory writable by others (like `/tmp`), only an entry's owner may
/// rename or remove it.
const STICKY: u32 = 0o1000;

/// How deep [`make_owner_writable`] goes (each level holds a descriptor).
const MAX_WALK_DEPTH: usize = 256;

/// This process's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A claimed state dir: checked, marked as arservice's, and locked for as long as it lives.
pub struct StateDir {
    path: PathBuf,
    _lock: File,
}

impl StateDir {
    /// The state dir's path, with no symbolic link in it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `path` this server's state dir, or says why it cannot be.
    ///
    /// A missing directory is created (0700). An existing one must be a real directory (not
    /// a link) of this user, writable by no one else, and either carry the marker or be
    /// empty; each ancestor must be writable only by root or this user (or be sticky, like
    /// `/tmp`). Then the marker is written, the directory made 0700, the lock taken and the
    /// private subdirectories made. Nothing is removed or changed when a check fails.
    pub fn claim(path: &Path) -> Result<StateDir, String> {
        let shown = path.display();
        let absolute = std::path::absolute(path)
            .map_err(|err| format!("cannot create state dir {shown}: {err}"))?;
        let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
            return Err(format!(
                "state dir {shown} must name a directory below another, like $HOME/.arservice"
            ));
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|err| format!("cannot create state dir {shown}: {err}"))?;
        let parent = std::fs::canonicalize(parent)
            .map_err(|err| format!("cannot create state dir {shown}: {err}"))?;
        check_ancestors(&parent, &absolute)?;
        let path = parent.join(name);
        let shown = path.display();
        match DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(format!("cannot create state dir {shown}: {err}")),
        }
        let dir = open_dir(&path).map_err(|err| format!("state dir {err}"))?;
        check_ours(&dir, &path).map_err(|why| format!("state dir {why}"))?;
        mark(&path)?;
        dir.set_permissions(std::fs::Permissions::from_mode(0o700))
            .map_err(|err| format!("state dir {shown}: cannot make it private: {err}"))?;
        let lock = lock(&path)?;
        for sub in SUBDIRS {
            private_dir(&path.join(sub)).map_err(|err| format!("state dir {shown}: {err}"))?;
        }
        Ok(StateDir { path, _lock: lock })
    }
}

/// The state dir when `--state-dir` is not given: `<tmp>/arservice-<uid>/<port>`, in a
/// per-user directory that must be this user's and private (it is created so when missing).
/// A per-user directory made by someone else is refused, never used: that user could have
/// planted links in it.
pub fn default_dir(port: u16) -> Result<PathBuf, String> {
    let per_user = std::env::temp_dir().join(format!("arservice-{}", euid()));
    private_dir(&per_user).map_err(|err| {
        format!("the default state dir's parent: {err}; remove it, or pass --state-dir DIR")
    })?;
    Ok(per_user.join(port.to_string()))
}

/// Every directory from `parent` up to `/` must be writable by root and this user only, or
/// be sticky (`/tmp`): otherwise another user could rename the state dir away and put a
/// directory (or a link) of theirs in its place.
fn check_ancestors(parent: &Path, state_dir: &Path) -> Result<(), String> {
    let me = euid();
    for ancestor in parent.ancestors() {
        let meta = std::fs::symlink_metadata(ancestor).map_err(|err| {
            format!(
                "state dir {}: {}: {err}",
                state_dir.display(),
                ancestor.display()
            )
        })?;
        let mode = meta.mode() & 0o7777;
        let owner_ok = meta.uid() == 0 || meta.uid() == me;
        let writable_ok = mode & WRITABLE_BY_OTHERS == 0 || mode & STICKY != 0;
        if !owner_ok || !writable_ok {
            return Err(format!(
                "state dir {}: {} (owner uid {}, mode {mode:o}) can be changed by other users, who could replace the state dir with their own; choose a --state-dir under directories only you or root can write",
                state_dir.display(),
                ancestor.display(),
                meta.uid()
            ));
        }
    }
    Ok(())
}

/// A directory of ours: this user's, writable by no one else.
fn check_ours(dir: &File, path: &Path) -> Result<(), String> {
    let meta = dir
        .metadata()
        .map_err(|err| format!("{}: {err}", path.display()))?;
    let me = euid();
    if meta.uid() != me {
        return Err(format!(
            "{} belongs to uid {}, not to this server's user (uid {me}): arservice only uses a directory its own user made (someone may have planted this one); remove it or choose another --state-dir",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & WRITABLE_BY_OTHERS != 0 {
        return Err(format!(
            "{} can be written by other users (mode {:o}): choose a private --state-dir",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Proves the directory is arservice's: its marker is there, or the directory is empty and
/// gets one now. A directory with other files and no marker is someone's data: refused.
fn mark(path: &Path) -> Result<(), String> {
    let marker = path.join(MARKER);
    match std::fs::symlink_metadata(&marker) {
        Ok(meta) if meta.file_type().is_file() && meta.uid() == euid() => return Ok(()),
        Ok(_) => {
            return Err(format!(
                "state dir {}: {MARKER} is not a file of this user: choose another --state-dir",
                path.display()
            ))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(format!("state dir {}: {err}", path.display())),
    }
    let mut entries =
        std::fs::read_dir(path).map_err(|err| format!("state dir {}: {err}", path.display()))?;
    if let Some(entry) = entries.next() {
        let example = entry
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .unwrap_or_default();
        return Err(format!(
            "state dir {} holds files arservice did not make (such as '{example}', and no {MARKER} marker): arservice never uses or deletes them; give a new or empty directory with --state-dir",
            path.display()
        ));
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&marker)
        .map_err(|err| format!("state dir {}: cannot write {MARKER}: {err}", path.display()))?;
    io::Write::write_all(&mut file, MARKER_TEXT.as_bytes())
        .map_err(|err| format!("state dir {}: cannot write {MARKER}: {err}", path.display()))
}

/// Takes the state dir's lock (a file that is never followed if it is a link, never
/// truncated): two servers never share a state dir.
fn lock(path: &Path) -> Result<File, String> {
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path.join("lock"))
        .map_err(|err| {
            format!(
                "state dir {} is not usable: lock: {}",
                path.display(),
                describe(err)
            )
        })?;
    // SAFETY: flock on a descriptor we own; it only takes an advisory lock.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "state dir {} is in use by another arservice; give each server its own --state-dir",
            path.display()
        ));
    }
    Ok(lock)
}

/// Creates `path` (and missing parents) as a private directory (0700), or checks that the one
/// there is a real directory of this user; a directory of ours that others can reach is made
/// private. A link, a file, or another user's directory is an error, and is left as it is.
pub fn private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)?;
    let dir = open_dir(path)?;
    let meta = dir.metadata()?;
    if meta.uid() != euid() {
        return Err(io::Error::other(format!(
            "{} belongs to uid {}, not to this server's user (uid {})",
            path.display(),
            meta.uid(),
            euid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        dir.set_permissions(std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Opens a directory, refusing a link (`O_NOFOLLOW`) with a message that says so.
fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|err| {
            // O_DIRECTORY and O_NOFOLLOW together say ENOTDIR for a link: tell it apart.
            let link = std::fs::symlink_metadata(path).is_ok_and(|meta| meta.is_symlink());
            let why = if link {
                describe(io::Error::from_raw_os_error(libc::ELOOP))
            } else {
                describe(err)
            };
            io::Error::other(format!("{}: {why}", path.display()))
        })
}

/// An error in words a reader of the refusal understands.
fn describe(err: io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::ELOOP) => {
            "it is a symbolic link, which arservice never follows here (give the real path)"
                .to_string()
        }
        Some(libc::ENOTDIR) => "it is not a directory".to_string(),
        _ => err.to_string(),
    }
}

/// Creates (or replaces) a private file (0600) for writing; a link at `path` is removed
/// first, never written through.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The content of the regular file at `path`, at most `limit` bytes: a link, a directory, a
/// FIFO or a longer file is an error, and nothing blocks on it.
pub fn read_regular(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.len() > limit {
        return Err(io::Error::other(format!("larger than {limit} bytes")));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::other(format!("larger than {limit} bytes")));
    }
    Ok(bytes)
}

/// Gives the owner full access to `dir` and every directory below it, going from descriptor
/// to descriptor: a directory swapped for a link during the walk is skipped, never followed.
/// Best effort; errors are ignored (the removal that follows reports what is left).
pub fn make_owner_writable(dir: &Path) {
    let Ok(top) = open_dir(dir) else {
        return;
    };
    let mut stack: Vec<(File, std::fs::ReadDir)> = Vec::new();
    let push = |stack: &mut Vec<(File, std::fs::ReadDir)>, dir: File| {
        let _ = dir.set_permissions(std::fs::Permissions::from_mode(0o700));
        // The descriptor's own entry in /proc names exactly the directory it holds.
        if let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) {
            stack.push((dir, entries));
        }
    };
    push(&mut stack, top);
    loop {
        let depth = stack.len();
        let Some((dir, entries)) = stack.last_mut() else {
            break;
        };
        let Some(entry) = entries.next() else {
            stack.pop();
            continue;
        };
        let Ok(entry) = entry else { continue };
        if !entry.file_type().is_ok_and(|kind| kind.is_dir()) || depth >= MAX_WALK_DEPTH {
            continue;
        }
        if let Some(child) = open_dir_at(dir, &entry.file_name()) {
            push(&mut stack, child);
        }
    }
}

/// Opens the directory `name` inside the directory `parent` holds, refusing a link.
fn open_dir_at(parent: &File, name: &std::ffi::OsStr) -> Option<File> {
    let name = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(name)).ok()?;
    // SAFETY: openat with a descriptor we hold and a NUL-terminated name; the result is a
    // new descriptor or -1.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    // SAFETY: a descriptor openat just returned is ours alone to own and close.
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ars-statedir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_new_dir_is_made_private_marked_and_locked() {
        let base = scratch("new");
        let path = base.join("state");
        let state = StateDir::claim(&path).unwrap();
        let mode = std::fs::metadata(state.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(state.path().join(MARKER).is_file());
        for sub in SUBDIRS {
            let mode = std::fs::metadata(state.path().join(sub)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o700, "{sub}");
        }
        let again = StateDir::claim(&path).err().unwrap();
        assert!(again.contains("in use by another arservice"), "{again}");
        drop(state);
        // Marked: it is claimed again after the first server went.
        StateDir::claim(&path).unwrap();
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn an_empty_dir_is_taken_and_one_with_data_refused_untouched() {
        let base = scratch("data");
        let empty = base.join("empty");
        std::fs::create_dir(&empty).unwrap();
        StateDir::claim(&empty).unwrap();
        let data = base.join("data");
        std::fs::create_dir_all(data.join("instances")).unwrap();
        std::fs::write(data.join("lock"), "mine").unwrap();
        let why = StateDir::claim(&data).err().unwrap();
        assert!(why.contains("did not make"), "{why}");
        assert_eq!(std::fs::read_to_string(data.join("lock")).unwrap(), "mine");
        assert!(!data.join(MARKER).exists());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn links_are_refused_wherever_they_are() {
        let base = scratch("links");
        let target = base.join("target");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, base.join("link")).unwrap();
        let why = StateDir::claim(&base.join("link")).err().unwrap();
        assert!(why.contains("symbolic link"), "{why}");
        assert!(private_dir(&base.join("link")).is_err());
        let file = base.join("file");
        std::fs::write(&file, "x").unwrap();
        std::os::unix::fs::symlink(&file, base.join("record")).unwrap();
        assert!(read_regular(&base.join("record"), 10).is_err());
        assert_eq!(read_regular(&file, 10).unwrap(), b"x");
        assert!(read_regular(&file, 0).is_err(), "over the limit");
        let mut written = create_private_file(&base.join("record")).unwrap();
        io::Write::write_all(&mut written, b"new").unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "x",
            "not written through"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_dir_others_can_write_is_refused() {
        let base = scratch("open");
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let why = StateDir::claim(&open).err().unwrap();
        assert!(why.contains("written by other users"), "{why}");
        let why = StateDir::claim(&open.join("below")).err().unwrap();
        assert!(why.contains("can be changed by other users"), "{why}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn owner_access_is_given_back_below_a_dir_without_following_links() {
        let base = scratch("writable");
        let outside = base.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o555)).unwrap();
        let tree = base.join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("a/link")).unwrap();
        std::fs::set_permissions(tree.join("a/b"), std::fs::Permissions::from_mode(0o500)).unwrap();
        std::fs::set_permissions(tree.join("a"), std::fs::Permissions::from_mode(0o500)).unwrap();
        make_owner_writable(&tree);
        for dir in ["a", "a/b"] {
            let mode = std::fs::metadata(tree.join(dir)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o700, "{dir}");
        }
        let mode = std::fs::metadata(&outside).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o555, "the link's target was changed");
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _ = std::fs::remove_dir_all(&base);
    }
}
