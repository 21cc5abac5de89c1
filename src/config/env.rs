//! `${VAR}` expansion of the configuration text, before it is parsed: a deployment writes
//! `site: ${POD_NAME}` and every agent of a StatefulSet reads its own name. An unset variable
//! stops the agent with its name and line rather than leaving an empty value to fail later;
//! comments are left alone, so a commented-out reference needs no variable. Also home of
//! [`code_len`], the comment finder the line locators share.

use super::ConfigError;

/// Origin shown in errors from [`expand_env`] when no file path is known.
const DEFAULT_ORIGIN: &str = "causeway.yaml";

/// Replaces every `${VAR}` in `text` by `lookup(VAR)`. An unset variable is
/// an error naming it and its line; `$${` stands for a literal `${`; a `$`
/// not followed by `{` is kept as is. Comments are left alone: text from a
/// `#` at the start of a line or after whitespace, outside quotes (judged
/// line by line), to the end of the line. Values are inserted verbatim, so a
/// value with YAML syntax in it (or a newline, which shifts later line
/// numbers) should be quoted around the reference. Errors name the origin
/// `causeway.yaml`; [`super::Config::load`] names the real path.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    expand_env_in(text, DEFAULT_ORIGIN, &lookup)
}

/// [`expand_env`] with the origin to put in errors.
pub(super) fn expand_env_in(
    text: &str,
    origin: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let lineno = index + 1;
        let syntax = |what: String| ConfigError::Parse {
            origin: origin.to_owned(),
            message: format!("{what} at line {lineno}"),
        };
        let code_len = code_len(line);
        let (code, comment) = line.split_at(code_len);
        let mut rest = code;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("$${") {
                out.push_str("${");
                rest = after;
            } else if let Some(after) = tail.strip_prefix("${") {
                let Some(end) = after.find('}') else {
                    return Err(syntax(
                        "unterminated `${`: expected `${NAME}` (write `$${` for a literal `${`)".to_owned(),
                    ));
                };
                let name = &after[..end];
                if !is_env_name(name) {
                    return Err(syntax(format!(
                        "`${{{name}}}` is not a variable reference: a name is letters, digits \
                         and '_', not starting with a digit (write `$${{` for a literal `${{`)"
                    )));
                }
                match lookup(name) {
                    Some(value) => out.push_str(&value),
                    None => {
                        return Err(ConfigError::UnsetVar {
                            origin: origin.to_owned(),
                            var: name.to_owned(),
                            line: lineno,
                        });
                    }
                }
                rest = &after[end + 1..];
            } else {
                out.push('$');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    Ok(out)
}

/// Whether `s` is an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Byte length of `line` before its YAML comment, if any: a `#` at the start
/// or after whitespace, outside single or double quotes. A quote opens a
/// quoted scalar only at the start of a value (after whitespace or `[{,:`),
/// so apostrophes inside plain words don't count.
pub(super) fn code_len(line: &str) -> usize {
    #[derive(PartialEq)]
    enum State {
        Plain,
        Single,
        Double,
    }
    let mut state = State::Plain;
    let mut prev: Option<char> = None;
    let mut chars = line.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match state {
            State::Plain => {
                let at_value_start = prev.is_none_or(|p| p.is_whitespace() || "[{,:".contains(p));
                if c == '#' && prev.is_none_or(char::is_whitespace) {
                    return i;
                }
                if c == '\'' && at_value_start {
                    state = State::Single;
                } else if c == '"' && at_value_start {
                    state = State::Double;
                }
            }
            State::Single => {
                if c == '\'' {
                    if chars.peek().is_some_and(|(_, n)| *n == '\'') {
                        chars.next();
                    } else {
                        state = State::Plain;
                    }
                }
            }
            State::Double => {
                if c == '\\' {
                    chars.next();
                } else if c == '"' {
                    state = State::Plain;
                }
            }
        }
        prev = Some(c);
    }
    line.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{no_env, parse};

    #[test]
    fn env_expansion() {
        let lookup = |name: &str| (name == "POD_NAME").then(|| "london".to_owned());
        let out = expand_env("site: ${POD_NAME}\nnamespace: ns-${POD_NAME}\n", lookup).unwrap();
        assert_eq!(out, "site: london\nnamespace: ns-london\n");
        assert_eq!(parse(&out).unwrap().site, "london");
        let quoted = expand_env("site: \"${POD_NAME}\" # it's ${UNSET}\n", lookup).unwrap();
        assert_eq!(quoted, "site: \"london\" # it's ${UNSET}\n");
    }

    #[test]
    fn env_unset_names_var_and_line() {
        let e = expand_env("site: a\n\nnamespace: ${POD_NAMESPACE}\n", no_env).unwrap_err();
        match &e {
            ConfigError::UnsetVar { var, line, .. } => {
                assert_eq!(var, "POD_NAMESPACE");
                assert_eq!(*line, 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("POD_NAMESPACE") && msg.contains("line 3"), "{msg}");
        let e = expand_env("a: ${BAD NAME}\n", no_env).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = expand_env("a: b\na: ${OPEN\n", no_env).unwrap_err().to_string();
        assert!(e.contains("unterminated") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn env_escape() {
        let out = expand_env("a: \"$${HOME} costs $5 and $$\"\n", no_env).unwrap();
        assert_eq!(out, "a: \"${HOME} costs $5 and $$\"\n");
    }

    #[test]
    fn env_comments_not_expanded() {
        let text = "# set ${NOPE} first\nsite: a # or ${NOPE}\nx: 'a # ${Q}'\ny: b#${Q}\n";
        let lookup = |name: &str| (name == "Q").then(|| "q".to_owned());
        let out = expand_env(text, lookup).unwrap();
        assert_eq!(out, "# set ${NOPE} first\nsite: a # or ${NOPE}\nx: 'a # q'\ny: b#q\n");
        let text = "z: 'it''s' # ${NOPE}\nw: \"a \\\" # ${Q}\" # ${NOPE}\n";
        let out = expand_env(text, lookup).unwrap();
        assert_eq!(out, "z: 'it''s' # ${NOPE}\nw: \"a \\\" # q\" # ${NOPE}\n");
    }
}
