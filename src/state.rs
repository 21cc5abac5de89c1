//! The site's state directory: where its keys, certificates, grants, links and VIPs live.
//!
//! Everything an agent must remember across restarts is a small file in one directory
//! (`--state DIR`). This module names those files and writes them durably: a write goes to a
//! temporary file in the same directory, is flushed to disk, and is renamed over the old file,
//! so a crash leaves either the old or the new content, never half of each. Secrets are
//! created with mode 0600 from the start (never chmod-ed after the fact).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors reading or writing the state directory; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

impl StateError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        StateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Paths of every file in a site's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// The directory itself (`--state`).
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }
    /// The site CA certificate (PEM); shared with peers inside tokens.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    /// The site CA private key (PEM); never leaves this directory.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// The agent certificate, signed by the site CA, presented on every link.
    pub fn agent_cert(&self) -> PathBuf {
        self.root.join("agent.crt")
    }
    /// The agent's private key.
    pub fn agent_key(&self) -> PathBuf {
        self.root.join("agent.key")
    }
    /// Default location of the configuration file.
    pub fn config(&self) -> PathBuf {
        self.root.join("causeway.yaml")
    }
    /// Grants issued by `token issue` and their redemptions.
    pub fn grants(&self) -> PathBuf {
        self.root.join("grants.yaml")
    }
    /// Links to other sites (both the ones we dial and the ones that dial us).
    pub fn links(&self) -> PathBuf {
        self.root.join("links.yaml")
    }
    /// This site's VIP allocation: every endpoint's VIP, and freed VIPs with the time they
    /// were freed, so a restart cannot move a VIP or hand a freed one out too soon.
    pub fn vips(&self) -> PathBuf {
        self.root.join("vips.yaml")
    }
    /// Where the agent binds its admin socket: `admin.sock` in the state directory, or, when
    /// that is read-only (a sidecar's state is a mounted Secret), `causeway-<hash of the
    /// state path>.sock` in the first private runtime directory ([`runtime_dirs`]) that is
    /// ours or can be made ours. A directory that exists with another owner or a mode that
    /// lets others in is skipped with a warning: in a shared directory another user could
    /// otherwise bind the socket first, keep the agent from starting and read the CLI's
    /// requests, token text included.
    pub fn bind_admin_socket(&self) -> Result<PathBuf, SocketDirError> {
        if writable(&self.root) || !self.root.exists() {
            return Ok(self.root.join("admin.sock"));
        }
        let mut refused = Vec::new();
        for dir in runtime_dirs() {
            match ensure_private_dir(&dir) {
                Ok(()) => {
                    for why in &refused {
                        tracing::warn!(reason = %why, "admin socket directory skipped");
                    }
                    return Ok(dir.join(self.socket_name()));
                }
                Err(e) => refused.push(e),
            }
        }
        Err(SocketDirError::NoPrivateDir(refused))
    }

    /// Where the CLI finds the agent's admin socket: the same place the agent chose
    /// ([`StateDir::bind_admin_socket`]), looking only in directories that are private to
    /// this user or root. A directory that has the socket but is not private is refused
    /// (unless a private one has it too): whoever controls it could be listening.
    pub fn admin_socket(&self) -> Result<PathBuf, SocketDirError> {
        if writable(&self.root) || !self.root.exists() {
            return Ok(self.root.join("admin.sock"));
        }
        let name = self.socket_name();
        let mut refused = None;
        let mut first = None;
        for dir in runtime_dirs() {
            let path = dir.join(&name);
            first.get_or_insert_with(|| path.clone());
            if fs::symlink_metadata(&path).is_err() {
                continue;
            }
            match check_dir(&dir) {
                Ok(()) => return Ok(path),
                Err(e) => {
                    refused.get_or_insert(e);
                }
            }
        }
        match refused {
            Some(e) => Err(e),
            // Not running: the first candidate is where it would be.
            None => first.ok_or(SocketDirError::NoPrivateDir(Vec::new())),
        }
    }

    /// The socket's file name outside the state directory, derived from the state path so
    /// that several agents of one user do not collide.
    fn socket_name(&self) -> String {
        let name = crate::names::fnv1a(self.root.to_string_lossy().as_bytes());
        format!("causeway-{name:016x}.sock")
    }

    /// Creates the directory (mode 0700) if it does not exist.
    pub fn create(&self) -> Result<(), StateError> {
        fs::create_dir_all(&self.root).map_err(|e| StateError::io(&self.root, e))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700)).map_err(|e| StateError::io(&self.root, e))
    }
}

/// Why no private directory for the admin socket could be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketDirError {
    #[error(
        "{dir} is owned by uid {owner}, not by you (uid {me}) or root: someone else may be \
         listening there, so it is not used; remove it, or set XDG_RUNTIME_DIR to a directory \
         of your own"
    )]
    WrongOwner { dir: PathBuf, owner: u32, me: u32 },
    #[error(
        "{dir} has mode {mode:04o}: other users may create or replace the admin socket in it, \
         so it is not used; run `chmod 700 {dir}` if it is yours, or remove it"
    )]
    WrongMode { dir: PathBuf, mode: u32 },
    #[error("{dir} is not a directory (a symbolic link or a file is in its place); remove it")]
    NotADirectory { dir: PathBuf },
    #[error("{dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the state directory is read-only and no private directory for the admin socket could \
         be used ({}); set XDG_RUNTIME_DIR to a directory only you can write",
        .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
    )]
    NoPrivateDir(Vec<SocketDirError>),
}

/// Candidate directories for the admin socket when the state directory is read-only, in the
/// order tried: `$XDG_RUNTIME_DIR/causeway` (the per-user runtime directory, when set),
/// `/run/causeway` (root only), and `causeway-<uid>` in the temporary directory.
pub fn runtime_dirs() -> Vec<PathBuf> {
    let me = rustix::process::geteuid().as_raw();
    let mut dirs = Vec::new();
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(xdg).join("causeway"));
    }
    if me == 0 {
        dirs.push(PathBuf::from("/run/causeway"));
    }
    dirs.push(std::env::temp_dir().join(format!("causeway-{me}")));
    dirs
}

/// What [`private_dir_problem`] looks at: the directory's own metadata, not its target's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirFacts {
    /// A real directory (not a symbolic link to one).
    pub is_dir: bool,
    pub owner: u32,
    pub mode: u32,
}

/// Whether a directory may hold the admin socket for user `me`: a real directory, owned by
/// `me` or root, that no one else may write or enter. Returns what is wrong, if anything.
pub fn private_dir_problem(dir: &Path, facts: DirFacts, me: u32) -> Option<SocketDirError> {
    if !facts.is_dir {
        return Some(SocketDirError::NotADirectory { dir: dir.to_path_buf() });
    }
    if facts.owner != me && facts.owner != 0 {
        return Some(SocketDirError::WrongOwner {
            dir: dir.to_path_buf(),
            owner: facts.owner,
            me,
        });
    }
    if facts.mode & 0o077 != 0 {
        return Some(SocketDirError::WrongMode {
            dir: dir.to_path_buf(),
            mode: facts.mode & 0o7777,
        });
    }
    None
}

/// Checks an existing directory with [`private_dir_problem`] (without following a link).
fn check_dir(dir: &Path) -> Result<(), SocketDirError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(dir).map_err(|source| SocketDirError::Io {
        dir: dir.to_path_buf(),
        source,
    })?;
    let facts = DirFacts {
        is_dir: meta.file_type().is_dir(),
        owner: meta.uid(),
        mode: meta.mode(),
    };
    match private_dir_problem(dir, facts, rustix::process::geteuid().as_raw()) {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

/// Creates `dir` with mode 0700 unless it exists, then checks it is private ([`check_dir`]):
/// `mkdir` never follows or replaces what another user put there first, so the check sees
/// exactly what will hold the socket.
fn ensure_private_dir(dir: &Path) -> Result<(), SocketDirError> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(SocketDirError::Io {
                dir: dir.to_path_buf(),
                source,
            });
        }
    }
    check_dir(dir)
}

/// Whether this process may create files in `dir` (honours read-only mounts).
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) with a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Writes `contents` to `path` atomically and durably with the given mode.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        StateError::io(path, e)
    })
}

/// Writes a new file that must not exist yet (mode given), failing if it does.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| StateError::io(path, e))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|e| StateError::io(path, e))
}

/// Reads a YAML file into `T`, or `T::default()` when the file does not exist.
pub fn read_yaml_or_default<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T, StateError> {
    match fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(T::default()),
        Ok(text) => serde_yaml::from_str(&text).map_err(|e| StateError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(StateError::io(path, e)),
    }
}

/// Writes `value` as YAML, atomically, mode 0600.
pub fn write_yaml<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let text = serde_yaml::to_string(value).map_err(|e| StateError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(path, text.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_dir_must_be_a_real_directory_of_ours_or_roots_closed_to_others() {
        let dir = Path::new("/tmp/causeway-1000");
        let ok = DirFacts {
            is_dir: true,
            owner: 1000,
            mode: 0o40700,
        };
        assert!(private_dir_problem(dir, ok, 1000).is_none());
        assert!(private_dir_problem(dir, DirFacts { owner: 0, ..ok }, 1000).is_none());
        let e = private_dir_problem(dir, DirFacts { owner: 65534, ..ok }, 1000).expect("someone else's");
        assert!(
            matches!(
                e,
                SocketDirError::WrongOwner {
                    owner: 65534,
                    me: 1000,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("uid 65534"), "{e}");
        for mode in [0o40755, 0o40770, 0o41777, 0o40701] {
            let e = private_dir_problem(dir, DirFacts { mode, ..ok }, 1000).expect("open to others");
            assert!(matches!(e, SocketDirError::WrongMode { .. }), "{mode:o}: {e}");
        }
        let e = private_dir_problem(dir, DirFacts { is_dir: false, ..ok }, 1000).expect("a link");
        assert!(matches!(e, SocketDirError::NotADirectory { .. }), "{e}");
    }

    #[test]
    fn ensure_private_dir_creates_0700_and_refuses_what_others_could_use() {
        let base = tempfile::tempdir().unwrap();
        let fresh = base.path().join("fresh");
        ensure_private_dir(&fresh).unwrap();
        assert_eq!(fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
        ensure_private_dir(&fresh).expect("ours already: used again");

        let open = base.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            ensure_private_dir(&open),
            Err(SocketDirError::WrongMode { .. })
        ));

        let link = base.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(matches!(
            ensure_private_dir(&link),
            Err(SocketDirError::NotADirectory { .. })
        ));
    }

    #[test]
    fn atomic_write_replaces_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.yaml");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_new_refuses_existing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_new(&p, b"a", 0o600).unwrap();
        assert!(write_new(&p, b"b", 0o600).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"a");
    }

    #[test]
    fn missing_yaml_is_default_and_garbage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("links.yaml");
        let v: Vec<String> = read_yaml_or_default(&p).unwrap();
        assert!(v.is_empty());
        fs::write(&p, "{{{").unwrap();
        let err = read_yaml_or_default::<Vec<String>>(&p).unwrap_err();
        assert!(err.to_string().contains("links.yaml"), "{err}");
    }
}

/// Serde for `SystemTime` as RFC 3339 text (UTC, whole seconds), the form users read in
/// state files and tokens.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn format(t: SystemTime) -> String {
        humantime::format_rfc3339_seconds(t).to_string()
    }

    pub fn parse(s: &str) -> Result<SystemTime, humantime::TimestampError> {
        humantime::parse_rfc3339_weak(s)
    }

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        parse_field(&String::deserialize(d)?)
    }

    /// [`parse`] for serde: the error names the text that did not parse.
    fn parse_field<E: serde::de::Error>(text: &str) -> Result<SystemTime, E> {
        parse(text).map_err(|e| E::custom(format!("{text:?}: {e}")))
    }

    /// The same for an optional time (absent or null when `None`).
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};
        use std::time::SystemTime;

        pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| super::parse_field(&text))
                .transpose()
        }
    }
}
