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
    /// The admin API's unix socket: in the state directory, or, when that is read-only (a
    /// sidecar's state is a mounted Secret), in the temporary directory under a name derived
    /// from the state path, so the CLI finds it the same way.
    pub fn admin_socket(&self) -> PathBuf {
        if writable(&self.root) || !self.root.exists() {
            return self.root.join("admin.sock");
        }
        let name = crate::vips::fnv1a(self.root.to_string_lossy().as_bytes());
        std::env::temp_dir().join(format!("causeway-{name:016x}.sock"))
    }

    /// Creates the directory (mode 0700) if it does not exist.
    pub fn create(&self) -> Result<(), StateError> {
        fs::create_dir_all(&self.root).map_err(|e| StateError::io(&self.root, e))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700)).map_err(|e| StateError::io(&self.root, e))
    }
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
