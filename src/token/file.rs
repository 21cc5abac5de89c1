//! Reading a token on the redeemer's side: a file, or `-` for standard input.
//!
//! Two rules apply before the text reaches [`Token::parse`](super::Token::parse):
//!
//! - **Size.** At most [`MAX_TOKEN_BYTES`] are read. A real token is about 1 KiB, so anything
//!   larger is something else (a wrong file, `/dev/zero`), and reading it whole would only
//!   exhaust memory or overflow the admin socket's frame.
//! - **Permissions.** A token is a secret and pins the issuer's CA. A file that others may
//!   write ([`Exposure::WorldWritable`]) could have been swapped for one that links this site
//!   to someone else, so it is refused; one that others may read ([`Exposure::Readable`]) has
//!   possibly leaked, which is worth a warning but not a refusal. Only regular files are
//!   judged: a pipe (`<(…)`, `/dev/stdin`) has no lasting mode to fix.
//!
//! [`exposure`] and [`read_capped`] are pure, so both rules are tested without files.

use std::fmt;
use std::io::Read;
use std::path::Path;

use super::MAX_TOKEN_BYTES;

/// Errors reading a token file or standard input.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    // The cause is the source, which error reports print after this.
    #[error("reading {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} larger than 64 KiB: not a causeway token")]
    TooLarge { what: String },
    #[error("{what} is not UTF-8 text: not a causeway token")]
    NotText { what: String },
    #[error(
        "token file {path} is world-writable (mode {mode:04o}): anyone on this machine could have \
         replaced it; fix with `chmod 600 {path}`, and if in doubt ask the issuer for a new token"
    )]
    WorldWritable { path: String, mode: u32 },
}

/// Who besides the owner may touch a token file, judged from its mode bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// Only the owner may read or write it.
    Private,
    /// Group or others may read it (or the group may write it): it may have leaked.
    Readable,
    /// Others may write it: it may have been replaced.
    WorldWritable,
}

/// Judges a file's mode bits (`st_mode`; only the permission bits count).
pub fn exposure(mode: u32) -> Exposure {
    if mode & 0o002 != 0 {
        Exposure::WorldWritable
    } else if mode & 0o077 != 0 {
        Exposure::Readable
    } else {
        Exposure::Private
    }
}

/// A warning about a token file that was read anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub path: String,
    pub mode: u32,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "token file {path} is accessible to group or others (mode {mode:04o}), and a token is a \
             secret: restrict it with `chmod 600 {path}`, and delete it once redeemed",
            path = self.path,
            mode = self.mode & 0o7777
        )
    }
}

/// Why [`read_capped`] stopped.
#[derive(Debug)]
pub enum CapError {
    /// More than the limit was offered.
    TooLarge,
    Io(std::io::Error),
}

/// Reads at most `limit` bytes; more than that is [`CapError::TooLarge`], found after reading
/// one byte past the limit and no more.
pub fn read_capped(reader: impl Read, limit: usize) -> Result<Vec<u8>, CapError> {
    let mut buf = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(CapError::Io)?;
    if buf.len() > limit {
        return Err(CapError::TooLarge);
    }
    Ok(buf)
}

fn text(bytes: Vec<u8>, what: &str) -> Result<String, TokenFileError> {
    String::from_utf8(bytes).map_err(|_| TokenFileError::NotText { what: what.to_string() })
}

fn capped(reader: impl Read, what: &str) -> Result<String, TokenFileError> {
    match read_capped(reader, MAX_TOKEN_BYTES) {
        Ok(bytes) => text(bytes, what),
        Err(CapError::TooLarge) => Err(TokenFileError::TooLarge { what: what.to_string() }),
        Err(CapError::Io(source)) => Err(TokenFileError::Io {
            what: what.to_string(),
            source,
        }),
    }
}

/// Reads a token from `source`: a file path, or `-` for standard input. Returns the text and,
/// for a file others may read, a warning to show.
pub fn read(source: &str) -> Result<(String, Option<Warning>), TokenFileError> {
    if source == "-" {
        return capped(std::io::stdin().lock(), "token on standard input").map(|t| (t, None));
    }
    read_file(Path::new(source))
}

/// Reads a token file: the mode is judged on the opened file (not the name, which could be
/// replaced in between), and a regular file's size before anything is read.
pub fn read_file(path: &Path) -> Result<(String, Option<Warning>), TokenFileError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    let what = format!("token file {shown}");
    let io = |source| TokenFileError::Io {
        what: what.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let mut warning = None;
    if meta.is_file() {
        let mode = meta.permissions().mode();
        match exposure(mode) {
            Exposure::WorldWritable => {
                return Err(TokenFileError::WorldWritable {
                    path: shown,
                    mode: mode & 0o7777,
                });
            }
            Exposure::Readable => warning = Some(Warning { path: shown, mode }),
            Exposure::Private => {}
        }
        if meta.len() > MAX_TOKEN_BYTES as u64 {
            return Err(TokenFileError::TooLarge { what });
        }
    }
    capped(file, &what).map(|t| (t, warning))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn mode_bits_decide_the_exposure() {
        assert_eq!(exposure(0o100600), Exposure::Private);
        assert_eq!(exposure(0o400), Exposure::Private);
        assert_eq!(exposure(0o100700), Exposure::Private);
        for readable in [0o640, 0o604, 0o644, 0o660, 0o610, 0o601] {
            assert_eq!(exposure(readable), Exposure::Readable, "{readable:o}");
        }
        for writable in [0o602, 0o666, 0o100622, 0o777] {
            assert_eq!(exposure(writable), Exposure::WorldWritable, "{writable:o}");
        }
    }

    #[test]
    fn reading_stops_one_byte_past_the_cap() {
        assert_eq!(read_capped(&b"abc"[..], 3).unwrap(), b"abc");
        assert!(matches!(read_capped(&b"abcd"[..], 3), Err(CapError::TooLarge)));
        // An endless input is refused after limit + 1 bytes.
        let mut endless = std::io::repeat(0).take(u64::MAX);
        let mut counted = CountingReader {
            inner: &mut endless,
            read: 0,
        };
        assert!(matches!(read_capped(&mut counted, 1000), Err(CapError::TooLarge)));
        assert_eq!(counted.read, 1001);
    }

    struct CountingReader<R> {
        inner: R,
        read: usize,
    }

    impl<R: Read> Read for CountingReader<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n;
            Ok(n)
        }
    }

    fn file_with(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn files_are_judged_by_mode_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let private = file_with(dir.path(), "private", b"version: 2\n", 0o600);
        assert_eq!(read_file(&private).unwrap(), ("version: 2\n".to_string(), None));

        let shared = file_with(dir.path(), "shared", b"x", 0o644);
        let (_, warning) = read_file(&shared).unwrap();
        let warning = warning.expect("a warning").to_string();
        assert!(
            warning.contains("mode 0644") && warning.contains(&format!("chmod 600 {}", shared.display())),
            "{warning}"
        );

        let open = file_with(dir.path(), "open", b"x", 0o666);
        let err = read_file(&open).unwrap_err().to_string();
        assert!(
            err.contains("world-writable") && err.contains(&format!("chmod 600 {}", open.display())),
            "{err}"
        );

        let big = file_with(dir.path(), "big", &vec![b'a'; MAX_TOKEN_BYTES + 1], 0o600);
        let err = read_file(&big).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("token file {} larger than 64 KiB: not a causeway token", big.display())
        );
        let exact = file_with(dir.path(), "exact", &vec![b'a'; MAX_TOKEN_BYTES], 0o600);
        assert!(read_file(&exact).is_ok());

        let binary = file_with(dir.path(), "binary", &[0xff, 0xfe, 0], 0o600);
        assert!(read_file(&binary).unwrap_err().to_string().contains("not UTF-8"));

        let missing = read_file(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(missing.starts_with("reading token file "), "{missing}");
    }

    #[test]
    fn devices_are_not_judged_by_mode_but_are_capped() {
        // /dev/zero is world-writable, yet not a file anyone can swap: the cap decides.
        let err = read_file(Path::new("/dev/zero")).unwrap_err().to_string();
        assert_eq!(err, "token file /dev/zero larger than 64 KiB: not a causeway token");
    }
}
