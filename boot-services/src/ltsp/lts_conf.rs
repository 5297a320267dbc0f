//! LTSP's lts.conf: `[section]` headers (`default`, a MAC, an IP address, a hostname, or a name
//! other sections pull in with `LIKE = name`), `KEY = value` lines, `#` comments. Values may be
//! in double quotes (with `\"`, `\\`, `\$` and `` \` `` escapes, as the shell reads them) or
//! single quotes (taken literally).

use super::ParseError;

/// One `KEY = value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// 1-based line.
    pub line: usize,
    /// The key as written.
    pub key: String,
    /// The value without its quotes.
    pub value: String,
}

/// A `[name]` section and its assignments in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Line of the header.
    pub line: usize,
    /// The name between the brackets.
    pub name: String,
    /// Its lines.
    pub assignments: Vec<Assignment>,
}

impl Section {
    /// The value of `key` (compared without case, as LTSP's shell variables are upper case by
    /// convention), if the section sets it.
    pub fn get(&self, key: &str) -> Option<&Assignment> {
        self.assignments
            .iter()
            .rev()
            .find(|assignment| assignment.key.eq_ignore_ascii_case(key))
    }
}

fn syntax(line: usize, reason: impl Into<String>) -> ParseError {
    ParseError {
        file: "lts.conf",
        line,
        reason: reason.into(),
    }
}

/// Parses `text`. Lines before the first header belong to `[default]`, as in LTSP.
pub fn parse(text: &str) -> Result<Vec<Section>, ParseError> {
    let mut sections: Vec<Section> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(header) = trimmed.strip_prefix('[') {
            let Some(name) = header.strip_suffix(']') else {
                return Err(syntax(line, "a section header lacks its `]`"));
            };
            let name = name.trim();
            if name.is_empty() {
                return Err(syntax(line, "a section needs a name"));
            }
            sections.push(Section {
                line,
                name: name.to_owned(),
                assignments: Vec::new(),
            });
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(syntax(
                line,
                "expected `KEY = value`, `[section]` or a comment",
            ));
        };
        let key = key.trim();
        let key_is_valid = key
            .bytes()
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic() || first == b'_')
            && key
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
        if !key_is_valid {
            return Err(syntax(
                line,
                format!("{key:?} is not a variable name (letters, digits and _)"),
            ));
        }
        let value = unquote(value.trim()).map_err(|reason| syntax(line, reason))?;
        if sections.is_empty() {
            sections.push(Section {
                line,
                name: "default".to_owned(),
                assignments: Vec::new(),
            });
        }
        if let Some(section) = sections.last_mut() {
            section.assignments.push(Assignment {
                line,
                key: key.to_owned(),
                value,
            });
        }
    }
    Ok(sections)
}

/// The value the shell would see for `text` (one quoted or unquoted word, possibly followed by
/// a `#` comment).
fn unquote(text: &str) -> Result<String, String> {
    let mut characters = text.chars();
    match characters.next() {
        Some('"') => {
            let mut value = String::new();
            loop {
                match characters.next() {
                    None => return Err("a double-quoted value is not closed".into()),
                    Some('"') => break,
                    Some('\\') => match characters.next() {
                        Some(escaped @ ('"' | '\\' | '$' | '`')) => value.push(escaped),
                        Some(other) => {
                            value.push('\\');
                            value.push(other);
                        }
                        None => return Err("a double-quoted value is not closed".into()),
                    },
                    Some(character) => value.push(character),
                }
            }
            expect_only_comment(characters.as_str())?;
            Ok(value)
        }
        Some('\'') => {
            let rest = characters.as_str();
            let Some((value, after)) = rest.split_once('\'') else {
                return Err("a single-quoted value is not closed".into());
            };
            expect_only_comment(after)?;
            Ok(value.to_owned())
        }
        _ => {
            let value = text.split(" #").next().unwrap_or(text).trim_end();
            Ok(value.to_owned())
        }
    }
}

fn expect_only_comment(rest: &str) -> Result<(), String> {
    let rest = rest.trim();
    if rest.is_empty() || rest.starts_with('#') {
        Ok(())
    } else {
        Err(format!("{rest:?} after the quoted value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_values_and_quotes() {
        let text = "SERVER = 10.9.0.1\n[default]\n# comment\nA = \"x \\\"y\\\" \\$HOME\"\n\
                    B='single $x' # trailing\n[00:11:22:33:44:55]\nLIKE = gpu\n";
        let sections = parse(text).unwrap();
        assert_eq!(sections.len(), 3);
        assert_eq!(sections[0].name, "default");
        assert_eq!(sections[0].get("server").unwrap().value, "10.9.0.1");
        assert_eq!(sections[1].get("A").unwrap().value, "x \"y\" $HOME");
        assert_eq!(sections[1].get("B").unwrap().value, "single $x");
        assert_eq!(sections[2].get("LIKE").unwrap().line, 7);
    }

    #[test]
    fn broken_lines_name_themselves() {
        for (text, line) in [
            ("[default\n", 1),
            ("[default]\nA = \"open\n", 2),
            ("[default]\n\nnot an assignment\n", 3),
            ("[default]\n1X = y\n", 2),
            ("A = \"x\" y\n", 1),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("lts.conf:{line}:")),
                "{text:?}: {error}"
            );
        }
    }
}
