//! `name:tag`, the human name of an image.

use std::fmt;

/// Longest name or tag.
pub const REFERENCE_PART_BYTES_MAX: usize = 128;

/// An image reference: `name:tag`. Names are lowercase letters, digits and `.`, `_`, `-`
/// (starting with a letter or digit); tags are letters, digits and `.`, `_`, `-` (not starting
/// with `.` or `-`). Neither may contain `/` or `:`, so both fit in paths and export names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageReference {
    /// The image name.
    pub name: String,
    /// The tag.
    pub tag: String,
}

/// A reference outside the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {text:?} is not valid: {rule}")]
pub struct ReferenceError {
    /// "name" or "tag".
    pub what: &'static str,
    /// What was given (cut short).
    pub text: String,
    /// The rule broken.
    pub rule: &'static str,
}

impl ImageReference {
    /// Checks both halves.
    pub fn new(name: &str, tag: &str) -> Result<Self, ReferenceError> {
        check_part(
            "name",
            name,
            |byte| {
                byte.is_ascii_lowercase()
                    || byte.is_ascii_digit()
                    || matches!(byte, b'.' | b'_' | b'-')
            },
            "1-128 of a-z 0-9 . _ -, starting with a letter or digit",
        )?;
        check_part(
            "tag",
            tag,
            |byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'),
            "1-128 of A-Z a-z 0-9 . _ -, starting with a letter, digit or _",
        )?;
        Ok(Self {
            name: name.to_owned(),
            tag: tag.to_owned(),
        })
    }

    /// Parses `name:tag`; a missing tag means `latest`, as with container images.
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        match text.split_once(':') {
            Some((name, tag)) => Self::new(name, tag),
            None => Self::new(text, "latest"),
        }
    }
}

fn check_part(
    what: &'static str,
    text: &str,
    allowed: impl Fn(u8) -> bool,
    rule: &'static str,
) -> Result<(), ReferenceError> {
    let bytes = text.as_bytes();
    let starts_well = bytes
        .first()
        .is_some_and(|first| first.is_ascii_alphanumeric() || (what == "tag" && *first == b'_'));
    if !starts_well || bytes.len() > REFERENCE_PART_BYTES_MAX || !bytes.iter().all(|b| allowed(*b))
    {
        return Err(ReferenceError {
            what,
            text: text.chars().take(REFERENCE_PART_BYTES_MAX + 8).collect(),
            rule,
        });
    }
    Ok(())
}

impl fmt::Display for ImageReference {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}", self.name, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(text: &str, expected: Option<(&str, &str)>) {
        let parsed = ImageReference::parse(text).ok();
        let parsed = parsed.as_ref().map(|r| (r.name.as_str(), r.tag.as_str()));
        assert_eq!(parsed, expected, "{text:?}");
    }

    #[test]
    fn grammar() {
        check("node:v1", Some(("node", "v1")));
        check("node", Some(("node", "latest")));
        check(
            "k8s-node.debian_12:2026.11-rc_1",
            Some(("k8s-node.debian_12", "2026.11-rc_1")),
        );
        check("node:_x", Some(("node", "_x")));
        check("Node:v1", None);
        check("a/b:v1", None);
        check("node:", None);
        check(":v1", None);
        check("node:v1:v2", None);
        check("node:.v1", None);
        check("-node:v1", None);
        check("node:v 1", None);
        check(&format!("{}:v1", "n".repeat(129)), None);
    }
}
