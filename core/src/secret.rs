//! Reading a secret from a file (`--token-file`, `--upstream-token-file`,
//! `--signing-key-file`): its content with surrounding whitespace trimmed
//! (editors add a final newline), refused when empty. Secrets come from
//! files, never from flags, so they do not show in `ps` or shell history.

use std::path::{Path, PathBuf};

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

#[cfg(test)]
mod tests {
    use super::*;

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
