//! Who an agent is: the one rule that turns a certificate name into the identity the
//! relay stores under, and the registry that keeps two identities from looking alike.
//!
//! The rule ([`normalize`]), applied to the subject Common Name or DNS name
//! [`crate::tls::identity_from_cert`] picked:
//!
//! 1. Unicode NFC, so one name has one spelling in bytes (`é` precomposed or not);
//! 2. ASCII letters lower-cased (`Agent-01` is `agent-01`): the simplest rule an
//!    operator can read; other letters keep their case (there is no safe locale-free
//!    case folding for them, and the look-alike check below covers what matters);
//! 3. refused: control, format and bidi characters (U+200B, U+202E, U+FEFF, …), any
//!    whitespace but the plain space, `*` (a wildcard DNS name is not one host),
//!    non-ASCII characters outside the UTS #39 General Security Profile (compatibility
//!    forms such as fullwidth `ａ`, symbols, obsolete scripts), and names that mix
//!    scripts the way spoofed names do (Latin with Cyrillic or Greek; Han with Latin, as
//!    in `臺北市政府-web01`, is fine);
//! 4. the result must still be one safe directory name
//!    ([`crate::tls::validate_identity`]).
//!
//! Two different identities may still look alike (`web-01` and `web-0l`, Latin `a` and
//! Cyrillic `а` in a single-script name): [`Identities`] keys each identity by its UTS
//! #39 confusable skeleton (lower-cased) and refuses a new identity whose key another
//! identity already holds, so `soclink status` never lists two agents an operator
//! cannot tell apart.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use unicode_normalization::UnicodeNormalization;
use unicode_security::{GeneralSecurityProfile, RestrictionLevel, RestrictionLevelDetection};

/// Why a name cannot be an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{shown} contains {what} U+{code:04X}: an identity must read the same to everyone")]
    Invisible {
        shown: String,
        what: &'static str,
        code: u32,
    },
    #[error(
        "{shown} contains `*`: a wildcard names many hosts, an identity names one (issue the \
         agent a certificate with its own name)"
    )]
    Wildcard { shown: String },
    #[error(
        "{shown} contains {ch:?} (U+{code:04X}), which is not in the UTS #39 identifier \
         profile (compatibility forms such as fullwidth letters, symbols, rare scripts)"
    )]
    NotAllowed { shown: String, ch: char, code: u32 },
    #[error("{shown} mixes scripts the way spoofed names do (e.g. Latin with Cyrillic or Greek)")]
    MixedScripts { shown: String },
    #[error("{shown} is not usable as a directory name: {reason}")]
    Unsafe { shown: String, reason: String },
    #[error(
        "{identity:?} looks like the existing agent {existing:?} (same confusable skeleton \
         {skeleton:?}): two agents an operator cannot tell apart must not exist; {hint}"
    )]
    LookAlike {
        identity: String,
        existing: String,
        skeleton: String,
        hint: String,
    },
}

/// A name as it is safe to print in an error: escaped, bounded.
fn shown(raw: &str) -> String {
    let cut: String = raw.chars().take(crate::tls::MAX_IDENTITY_LEN).collect();
    format!("{:?}", cut.escape_default().to_string())
}

/// What kind of invisible character `c` is, if it is one.
fn invisible(c: char) -> Option<&'static str> {
    let code = c as u32;
    if c.is_control() {
        return Some("the control character");
    }
    // Bidi embeddings, overrides and isolates, and the implicit marks.
    if matches!(code, 0x202A..=0x202E | 0x2066..=0x2069 | 0x200E | 0x200F | 0x061C) {
        return Some("the bidi control");
    }
    // Zero-width and other format characters (General Category Cf), soft hyphen, BOM,
    // and the default-ignorable fillers that render as nothing.
    if matches!(
        code,
        0x00AD
            | 0x034F
            | 0x0600..=0x0605
            | 0x06DD
            | 0x070F
            | 0x115F
            | 0x1160
            | 0x17B4
            | 0x17B5
            | 0x180B..=0x180F
            | 0x200B..=0x200D
            | 0x2060..=0x2064
            | 0x206A..=0x206F
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFFB
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
    ) {
        return Some("the invisible format character");
    }
    if c.is_whitespace() && c != ' ' {
        return Some("the whitespace character");
    }
    None
}

/// The identity a certificate name stands for (see the module doc for the rule).
pub fn normalize(raw: &str) -> Result<String, IdentityError> {
    for c in raw.chars() {
        if let Some(what) = invisible(c) {
            return Err(IdentityError::Invisible {
                shown: shown(raw),
                what,
                code: c as u32,
            });
        }
        if c == '*' {
            return Err(IdentityError::Wildcard { shown: shown(raw) });
        }
    }
    let id: String = raw.nfc().map(|c| c.to_ascii_lowercase()).collect();
    for c in id.chars().filter(|c| !c.is_ascii()) {
        if !GeneralSecurityProfile::identifier_allowed(c) {
            return Err(IdentityError::NotAllowed {
                shown: shown(raw),
                ch: c,
                code: c as u32,
            });
        }
    }
    // Scripts are judged on letters and digits only: ASCII punctuation (`-`, `.`, `_`,
    // space) is common to every script and not in the identifier profile.
    let letters: String = id
        .chars()
        .filter(|c| !c.is_ascii() || c.is_ascii_alphanumeric())
        .collect();
    if letters.as_str().detect_restriction_level() > RestrictionLevel::HighlyRestrictive {
        return Err(IdentityError::MixedScripts { shown: shown(raw) });
    }
    crate::tls::validate_identity(&id).map_err(|e| IdentityError::Unsafe {
        shown: shown(raw),
        reason: match e {
            crate::tls::TlsError::BadIdentity { reason, .. } => reason.to_string(),
            other => other.to_string(),
        },
    })?;
    Ok(id)
}

/// The identity an agent's relay will know it by: that of its upstream certificate,
/// so incident records and bundle manifests name the agent as the relay checks it;
/// without an upstream (or an unreadable certificate, which the shipper reports), the
/// configured `id`.
pub fn of_agent(cfg: &crate::config::AgentConfig) -> String {
    let Some(up) = &cfg.upstream else {
        return cfg.id.clone();
    };
    let id = crate::tls::load_certs(&up.cert).and_then(|certs| match certs.first() {
        Some(c) => crate::tls::identity_from_cert(c),
        None => Err(crate::tls::TlsError::NoIdentity),
    });
    match id {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(
                "cannot read the identity of {}: {e}; incidents name the agent {:?}",
                up.cert.display(),
                cfg.id
            );
            cfg.id.clone()
        }
    }
}

/// The key under which look-alike identities collide: the UTS #39 skeleton, lower-cased
/// (the skeleton maps `1` and `I` to `l`, `0` to `O`; lower-casing it afterwards also
/// folds `O` and `o`).
pub fn skeleton(id: &str) -> String {
    unicode_security::skeleton(id)
        .flat_map(char::to_lowercase)
        .collect()
}

/// The identities a relay knows, by skeleton. Adding one is refused when another
/// identity already holds its skeleton.
#[derive(Debug, Default)]
pub struct Identities {
    by_skeleton: Mutex<HashMap<String, String>>,
}

impl Identities {
    /// A registry holding `names` (e.g. the agent folders of a store). Names that
    /// already collide with each other are kept, and returned for a warning: nothing
    /// can be done about them automatically, but no third look-alike gets in.
    pub fn with(names: impl IntoIterator<Item = String>) -> (Identities, Vec<(String, String)>) {
        let mut map: HashMap<String, String> = HashMap::new();
        let mut clashes = Vec::new();
        for n in names {
            let key = skeleton(&n);
            match map.get(&key) {
                Some(existing) if *existing != n => clashes.push((existing.clone(), n)),
                Some(_) => {}
                None => {
                    map.insert(key, n);
                }
            }
        }
        (
            Identities {
                by_skeleton: Mutex::new(map),
            },
            clashes,
        )
    }

    /// The agent folders of a store directory (names that pass [`normalize`] unchanged
    /// or not: every folder an operator sees in the store counts).
    pub fn from_store_dir(store_dir: &Path) -> (Identities, Vec<(String, String)>) {
        let names = std::fs::read_dir(store_dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        Identities::with(names)
    }

    /// Admit `id` (already normalized): Ok if it is known or looks like no other.
    pub fn admit(&self, id: &str) -> Result<(), IdentityError> {
        let key = skeleton(id);
        let mut map = crate::util::lock(&self.by_skeleton);
        match map.get(&key) {
            Some(existing) if existing == id => Ok(()),
            Some(existing) => Err(IdentityError::LookAlike {
                identity: id.to_string(),
                existing: existing.clone(),
                skeleton: key,
                hint: if normalize(existing).as_deref() == Ok(id) {
                    format!(
                        "the store folder {existing:?} predates the identity rule (NFC, \
                         lower-case ASCII): stop the relay and rename it to {id:?}"
                    )
                } else {
                    "issue this agent a certificate with a clearly different name".to_string()
                },
            }),
            None => {
                map.insert(key, id.to_string());
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_forms() {
        assert_eq!(normalize("Agent-01").unwrap(), "agent-01");
        assert_eq!(
            normalize("A12345-WEB01.agency.gov.tw").unwrap(),
            "a12345-web01.agency.gov.tw"
        );
        // NFD é becomes NFC é.
        assert_eq!(normalize("cafe\u{301}").unwrap(), "caf\u{e9}");
        assert_eq!(normalize("臺北市政府-web01").unwrap(), "臺北市政府-web01");
        // Non-ASCII letters keep their case.
        assert_eq!(normalize("Éa").unwrap(), "Éa");
    }

    #[test]
    fn refused() {
        for bad in [
            "agent\u{200B}01",
            "agent\u{202E}10",
            "\u{FEFF}agent",
            "agent\u{00A0}01",
            "*.agency.gov.tw",
            "agent\u{FF41}", // fullwidth a
            "p\u{0430}ypal", // Latin with a Cyrillic a
            "agent\u{2665}", // a symbol
            "..",
            "a/b",
            "-rf",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn look_alikes_collide() {
        let (ids, clashes) = Identities::with(["web-01".to_string()]);
        assert!(clashes.is_empty());
        ids.admit("web-01").unwrap();
        for alike in ["web-0l", "web-o1", "web-ol", "WEB-0L"] {
            let alike = normalize(alike).unwrap_or_else(|_| alike.to_string());
            let e = ids.admit(&alike).unwrap_err();
            assert!(
                matches!(&e, IdentityError::LookAlike { existing, .. } if existing == "web-01"),
                "{alike:?}: {e}"
            );
        }
        ids.admit("web-02").unwrap();
        // The Cyrillic-only name looks like the Latin one.
        let (ids, _) = Identities::with(["cop".to_string()]);
        assert!(ids.admit("\u{0441}\u{043E}\u{0440}").is_err());
        let (_, clashes) = Identities::with(["Web-01".to_string(), "web-0l".to_string()]);
        assert_eq!(clashes.len(), 1);
    }
}
