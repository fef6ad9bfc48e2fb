//! Reading a secret from a file (`--token-file`, `--upstream-token-file`,
//! `--signing-key-file`): its content with surrounding whitespace trimmed
//! (editors add a final newline), refused when empty. Secrets come from
//! files, never from flags, so they do not show in `ps` or shell history.
//! And checking a bearer token against one ([`bearer_is`]).

use std::path::{Path, PathBuf};

use http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {} is empty", path.display())]
    Empty { flag: &'static str, path: PathBuf },
}

/// The trimmed bytes of the secret file at `path`, named `flag` in errors.
pub fn read_secret(path: &Path, flag: &'static str) -> Result<Vec<u8>, SecretError> {
    let text = std::fs::read(path).map_err(|source| SecretError::Read {
        flag,
        path: path.to_owned(),
        source,
    })?;
    let secret = text.trim_ascii();
    if secret.is_empty() {
        return Err(SecretError::Empty {
            flag,
            path: path.to_owned(),
        });
    }
    Ok(secret.to_vec())
}

/// Whether `Authorization: Bearer …` carries `expected`. The scheme is
/// matched without regard to case (RFC 9110, 11.1), the token with its
/// surrounding whitespace trimmed. The SHA-256 digests of the two are
/// compared, in constant time: comparing the bytes themselves returns at
/// once on a length mismatch, which tells a prober the token's length.
pub fn bearer_is(headers: &HeaderMap, expected: &[u8]) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or("");
    let digest = |bytes: &[u8]| Sha256::digest(bytes);
    !given.is_empty() && bool::from(digest(given.as_bytes()).ct_eq(&digest(expected)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn a_bearer_token_is_the_expected_one_or_refused() {
        let expected = b"s3cret";
        for accepted in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret "] {
            assert!(bearer_is(&authorization(accepted), expected), "{accepted}");
        }
        for refused in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "Bearers3cret",
            "s3cret",
            "Bearer ",
        ] {
            assert!(!bearer_is(&authorization(refused), expected), "{refused}");
        }
        assert!(!bearer_is(&HeaderMap::new(), expected));
    }

    #[test]
    fn secrets_are_trimmed_and_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        assert_eq!(read_secret(&path, "--token-file").unwrap(), b"s3cret");
        std::fs::write(&path, " \n").unwrap();
        let empty = read_secret(&path, "--token-file").unwrap_err();
        assert!(empty.to_string().contains("is empty"), "{empty}");
        let missing = read_secret(&dir.path().join("none"), "--token-file").unwrap_err();
        assert!(missing.to_string().starts_with("cannot read --token-file"));
    }
}
