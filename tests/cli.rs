//! End-to-end tests of the command line's contract: exit status 0 on success, 2 on a usage
//! error, 1 on any other, each failure one line on stderr; and how `token redeem` reads a
//! token file (size cap, permissions).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Site};

fn causeway(state: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--state")
        .arg(state)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run causeway")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One line on stderr, naming the error, and nothing on stdout.
fn assert_one_line_error(args: &[&str], o: &Output) {
    let err = stderr(o);
    assert!(
        err.starts_with("error: ") && err.ends_with('\n') && err.trim_end().lines().count() == 1,
        "`causeway {}`: not one error line on stderr: {err:?}",
        args.join(" ")
    );
    assert!(o.stdout.is_empty(), "`causeway {}` printed on stdout", args.join(" "));
}

#[test]
fn every_command_exits_2_on_a_bad_argument_and_1_on_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    // An initialised site whose agent is not running.
    let site = Site::init(dir.path(), "london");
    let missing_dir = dir.path().join("missing").join("t.token");
    let missing_dir = missing_dir.to_str().unwrap();
    let existing_dir = dir.path().to_str().unwrap();

    let usage: &[(&[&str], &str)] = &[
        (&[], "requires a subcommand"),
        (&["bogus"], "unrecognized subcommand 'bogus'"),
        (&["--log-format", "xml", "status"], "invalid value 'xml'"),
        (&["init"], "--site"),
        (&["init", "--site", "Bad_Site"], "not a valid site id"),
        (&["run", "--bogus"], "unexpected argument '--bogus'"),
        (&["token"], "requires a subcommand"),
        (
            &["token", "issue", "--expires", "soon"],
            "invalid value 'soon' for '--expires",
        ),
        (&["token", "issue", "--expires", "0s"], "between 1s and 30 days"),
        (&["token", "issue", "--expires", "90d"], "between 1s and 30 days"),
        (&["token", "issue", "--uses", "0"], "'--uses <USES>'"),
        (&["token", "issue", "--uses", "1001"], "'--uses <USES>'"),
        (&["token", "issue", "-o", missing_dir], "does not exist"),
        (&["token", "issue", "-o", existing_dir], "is a directory"),
        (&["token", "redeem"], "<FILE>"),
        (&["token", "redeem", "t.token", "--cost", "0"], "'--cost <COST>'"),
        (&["token", "redeem", "t.token", "--name", "Bad Name"], "DNS-1123 label"),
        (&["token", "list", "-o", "xml"], "invalid value 'xml'"),
        (&["token", "revoke", "xyz"], "hex digits"),
        (&["link"], "requires a subcommand"),
        (&["link", "list", "-o", "xml"], "invalid value 'xml'"),
        (&["link", "remove"], "<NAME>"),
        (&["link", "remove", "Bad_Name"], "DNS-1123 label"),
        (&["service", "list", "-o", "csv"], "invalid value 'csv'"),
        (&["status", "-o", "xml"], "invalid value 'xml'"),
        (&["resolve"], "<NAME>"),
        (&["resolve", "etcd", "--type", "MX"], "invalid value 'MX'"),
        (&["resolve", "bad..name"], "is not a DNS name"),
        (&["sidecar", "credentials"], "--output"),
        (
            &["sidecar", "credentials", "-o", "m.yaml", "--format", "zip"],
            "invalid value 'zip'",
        ),
        (
            &["sidecar", "credentials", "-o", "m.yaml", "--name", "Bad_Name"],
            "DNS-1123 subdomain",
        ),
        (&["demo", "--bogus"], "unexpected argument '--bogus'"),
    ];
    for (args, says) in usage {
        let o = causeway(&site.state, args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "`causeway {}` must be a usage error: {}",
            args.join(" "),
            stderr(&o)
        );
        assert_one_line_error(args, &o);
        let err = stderr(&o);
        assert!(err.contains(says), "`causeway {}`: {err}", args.join(" "));
    }
    // Clap's errors end with the help to read: the subcommand's.
    for (args, help) in [
        (&["token", "issue", "--uses", "0"][..], "causeway token issue --help"),
        (&["link"], "causeway link --help"),
        (&["bogus"], "causeway --help"),
    ] {
        let err = stderr(&causeway(&site.state, args));
        assert!(err.contains(&format!("; see `{help}`")), "{err}");
    }

    for args in [
        &["--help"][..],
        &["--version"],
        &["token", "--help"],
        &["token", "issue", "-h"],
    ] {
        let o = causeway(&site.state, args);
        assert_eq!(o.status.code(), Some(0), "`causeway {}`", args.join(" "));
        assert!(
            !o.stdout.is_empty() && o.stderr.is_empty(),
            "`causeway {}`",
            args.join(" ")
        );
    }

    // Well-formed commands that fail at run time: no agent is running.
    let runtime: &[&[&str]] = &[
        &["status"],
        &["token", "issue"],
        &["token", "list"],
        &["token", "revoke", "ab12"],
        &["token", "redeem", "no-such.token"],
        &["link", "list"],
        &["link", "remove", "paris"],
        &["service", "list"],
        &["init", "--site", "london"],
    ];
    for args in runtime {
        let o = causeway(&site.state, args);
        assert_eq!(
            o.status.code(),
            Some(1),
            "`causeway {}` must fail with 1: {}",
            args.join(" "),
            stderr(&o)
        );
        assert_one_line_error(args, &o);
    }
    let err = stderr(&causeway(&site.state, &["status"]));
    assert!(err.contains("running"), "names the missing agent: {err}");
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn token_files_are_bounded_and_must_not_be_writable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let london = Site::started(dir.path(), "london");
    let paris = Site::started(dir.path(), "paris");
    let token = london.issue(&[], &dir.path().join("paris.token"));
    let shown = token.to_str().unwrap();
    let mode = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "token issue -o writes mode 0600");

    // World-writable: refused, naming the file and the fix; the token stays usable.
    chmod(&token, 0o666);
    let err = paris.fails(&["token", "redeem", shown]);
    assert!(
        err.contains(&format!("token file {shown} is world-writable")) && err.contains(&format!("chmod 600 {shown}")),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // Too large, as a file and on standard input (an endless one: refused at once).
    let big = dir.path().join("big.token");
    std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    chmod(&big, 0o600);
    let err = paris.fails(&["token", "redeem", big.to_str().unwrap()]);
    assert!(err.contains("larger than 64 KiB: not a causeway token"), "{err}");
    let start = Instant::now();
    let o = Command::new(BIN)
        .arg("--state")
        .arg(&paris.state)
        .args(["token", "redeem", "-"])
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("token on standard input larger than 64 KiB: not a causeway token"),
        "{}",
        stderr(&o)
    );
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());

    // Readable by others: redeemed, with a warning.
    chmod(&token, 0o644);
    let o = paris.cli(&["token", "redeem", shown]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("linked to london"));
    let warn = stderr(&o);
    assert!(
        warn.contains("warning: token file")
            && warn.contains("mode 0644")
            && warn.contains(&format!("chmod 600 {shown}")),
        "{warn}"
    );
}

/// `intercept install` refuses a configuration in listen mode: its agent would not take the
/// redirected traffic, and every connection to a VIP would fail (found trying the deploy
/// Components: an overlay that replaced the sidecar's config lost `mode: intercept`).
#[test]
fn intercept_install_refuses_a_listen_mode_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("causeway.yaml");
    std::fs::write(&config, "site: london\nvips: {cidr: 127.77.0.0/16, mode: listen}\n").unwrap();
    let args = ["intercept", "install", "--config", config.to_str().unwrap()];
    let o = causeway(dir.path(), &args);
    assert_eq!(o.status.code(), Some(1));
    assert_one_line_error(&args, &o);
    assert!(stderr(&o).contains("set `vips: {mode: intercept}`"), "{}", stderr(&o));
    // IPv6 ranges cannot be intercepted: the configuration itself says so.
    std::fs::write(
        &config,
        "site: london\nvips: {cidr: \"fd00:77::/64\", mode: intercept}\n",
    )
    .unwrap();
    let o = causeway(dir.path(), &args);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("intercept needs an IPv4 vips.cidr"),
        "{}",
        stderr(&o)
    );
}

/// docs/REFERENCE.md shows the file `causeway init` writes, word for word, so the reference
/// cannot drift from the template.
#[test]
fn the_reference_shows_the_template_init_writes() {
    let reference = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/REFERENCE.md")).unwrap();
    let template = causeway::config::default_yaml(&"london".parse().unwrap());
    assert!(
        reference.contains(&format!("```yaml\n{template}```")),
        "docs/REFERENCE.md's `causeway init` template differs from config::default_yaml:\n{template}"
    );
}
