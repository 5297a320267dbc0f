//! The catalog: which manifest each `name:tag` names, and which tag each group of nodes boots
//! (with the tags it booted before, for rollback). Plain data; the store persists it, and the
//! consensus issue moves it into the replicated state.

use std::collections::BTreeMap;

use crate::hash::ContentHash;
use crate::reference::ImageReference;

/// Catalog layout version.
pub const CATALOG_FORMAT_VERSION: u32 = 1;
/// Earlier tags remembered per group.
pub const GROUP_HISTORY_MAX: usize = 32;

/// A group's image assignment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupImage {
    /// The tag the group boots now.
    pub current: String,
    /// The tags it booted before, most recent last.
    #[serde(default)]
    pub history: Vec<String>,
}

/// Tags and group assignments.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// [`CATALOG_FORMAT_VERSION`].
    pub format_version: u32,
    /// `name:tag` -> manifest hash.
    #[serde(default)]
    pub images: BTreeMap<String, ContentHash>,
    /// Group name -> what it boots.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupImage>,
}

impl Default for Catalog {
    fn default() -> Self {
        Self {
            format_version: CATALOG_FORMAT_VERSION,
            images: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }
}

/// A catalog change that cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// No image by that name.
    #[error("no image {0} in the catalog")]
    UnknownImage(String),
    /// The group never had an image.
    #[error("group {0:?} boots no image")]
    UnknownGroup(String),
    /// Nothing to roll back to.
    #[error("group {0:?} has no earlier image to roll back to")]
    NoHistory(String),
    /// The tag a rollback would return to was removed since.
    #[error(
        "group {group:?} booted {reference} before, but that image was removed; promote an image instead"
    )]
    PreviousImageGone {
        /// The group.
        group: String,
        /// The removed tag.
        reference: String,
    },
    /// Removing an image that groups boot.
    #[error("image {reference} is booted by group(s) {groups}; promote another image first")]
    InUse {
        /// The image.
        reference: String,
        /// The groups booting it.
        groups: String,
    },
    /// An unusable group name.
    #[error("group name {0:?} is not 1-64 of a-z A-Z 0-9 . _ -")]
    InvalidGroup(String),
}

impl Catalog {
    /// Parses the stored JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let catalog: Self = serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
        if catalog.format_version != CATALOG_FORMAT_VERSION {
            return Err(format!(
                "format version {} is not {CATALOG_FORMAT_VERSION}",
                catalog.format_version
            ));
        }
        Ok(catalog)
    }

    /// The stored JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, String> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|error| error.to_string())?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Points `reference` at `hash`; returns the hash it named before.
    pub fn tag(&mut self, reference: &ImageReference, hash: ContentHash) -> Option<ContentHash> {
        self.images.insert(reference.to_string(), hash)
    }

    /// The manifest a reference names.
    pub fn resolve(&self, reference: &str) -> Option<ContentHash> {
        self.images.get(reference).copied()
    }

    /// Removes a tag, unless a group boots it.
    pub fn untag(&mut self, reference: &str) -> Result<ContentHash, CatalogError> {
        let groups: Vec<&str> = self
            .groups
            .iter()
            .filter(|(_, group)| group.current == reference)
            .map(|(name, _)| name.as_str())
            .collect();
        if !groups.is_empty() {
            return Err(CatalogError::InUse {
                reference: reference.to_owned(),
                groups: groups.join(", "),
            });
        }
        self.images
            .remove(reference)
            .ok_or_else(|| CatalogError::UnknownImage(reference.to_owned()))
    }

    /// Makes `group` boot `reference`, remembering what it booted before.
    pub fn promote(&mut self, group: &str, reference: &str) -> Result<(), CatalogError> {
        check_group(group)?;
        if !self.images.contains_key(reference) {
            return Err(CatalogError::UnknownImage(reference.to_owned()));
        }
        match self.groups.get_mut(group) {
            Some(assignment) if assignment.current == reference => {}
            Some(assignment) => {
                let previous = std::mem::replace(&mut assignment.current, reference.to_owned());
                assignment.history.push(previous);
                let excess = assignment.history.len().saturating_sub(GROUP_HISTORY_MAX);
                assignment.history.drain(..excess);
            }
            None => {
                self.groups.insert(
                    group.to_owned(),
                    GroupImage {
                        current: reference.to_owned(),
                        history: Vec::new(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Returns `group` to the tag it booted before the last promote; returns that tag.
    pub fn rollback(&mut self, group: &str) -> Result<String, CatalogError> {
        let assignment = self
            .groups
            .get(group)
            .ok_or_else(|| CatalogError::UnknownGroup(group.to_owned()))?;
        let previous = assignment
            .history
            .last()
            .cloned()
            .ok_or_else(|| CatalogError::NoHistory(group.to_owned()))?;
        if !self.images.contains_key(&previous) {
            return Err(CatalogError::PreviousImageGone {
                group: group.to_owned(),
                reference: previous,
            });
        }
        if let Some(assignment) = self.groups.get_mut(group) {
            assignment.history.pop();
            assignment.current = previous.clone();
        }
        Ok(previous)
    }

    /// The manifest hash a group boots now, if its tag still exists.
    pub fn group_image(&self, group: &str) -> Option<(&str, ContentHash)> {
        let assignment = self.groups.get(group)?;
        let hash = self.resolve(&assignment.current)?;
        Some((assignment.current.as_str(), hash))
    }

    /// Every manifest hash the catalog names (tags; group history names tags too).
    pub fn referenced_manifests(&self) -> std::collections::BTreeSet<ContentHash> {
        self.images.values().copied().collect()
    }
}

fn check_group(group: &str) -> Result<(), CatalogError> {
    let valid = !group.is_empty()
        && group.len() <= 64
        && group
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(CatalogError::InvalidGroup(group.chars().take(80).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(text: &str) -> Result<ImageReference, Box<dyn std::error::Error>> {
        Ok(ImageReference::parse(text)?)
    }

    #[test]
    fn promote_and_rollback_switch_what_a_group_boots() -> Result<(), Box<dyn std::error::Error>> {
        let mut catalog = Catalog::default();
        let v1 = ContentHash::of(b"v1");
        let v2 = ContentHash::of(b"v2");
        catalog.tag(&reference("node:v1")?, v1);
        catalog.tag(&reference("node:v2")?, v2);
        assert_eq!(
            catalog.promote("workers", "node:v3"),
            Err(CatalogError::UnknownImage("node:v3".into()))
        );
        catalog.promote("workers", "node:v1")?;
        assert_eq!(
            catalog.rollback("workers"),
            Err(CatalogError::NoHistory("workers".into()))
        );
        catalog.promote("workers", "node:v2")?;
        assert_eq!(catalog.group_image("workers"), Some(("node:v2", v2)));
        assert!(matches!(
            catalog.untag("node:v2"),
            Err(CatalogError::InUse { .. })
        ));
        assert_eq!(catalog.rollback("workers")?, "node:v1");
        assert_eq!(catalog.group_image("workers"), Some(("node:v1", v1)));
        assert_eq!(catalog.untag("node:v2")?, v2);
        // A rollback never returns a group to a tag that is gone.
        catalog.tag(&reference("node:v3")?, v2);
        catalog.promote("workers", "node:v3")?;
        catalog.untag("node:v1")?;
        assert!(matches!(
            catalog.rollback("workers"),
            Err(CatalogError::PreviousImageGone { .. })
        ));
        assert_eq!(catalog.group_image("workers"), Some(("node:v3", v2)));
        let round_trip = Catalog::from_json(&catalog.to_json()?)?;
        assert_eq!(round_trip, catalog);
        assert!(Catalog::from_json(b"{\"format_version\":1,\"surprise\":1}").is_err());
        assert!(matches!(
            catalog.promote("a/b", "node:v1"),
            Err(CatalogError::InvalidGroup(_))
        ));
        Ok(())
    }
}
