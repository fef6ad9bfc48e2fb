//! The binary's command line, run as a process. (Also makes `cargo test`
//! build the `gitball-proxy` binary that the end-to-end tests in `tests/`
//! start.)

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

const BINARY: &str = env!("CARGO_BIN_EXE_gitball-proxy");

#[test]
fn help_names_every_flag_and_its_environment_variable() {
    let output = Command::new(BINARY).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--listen",
        "--routes",
        "--repos",
        "--upstream-token-file",
        "--signing-key-file",
        "--max-token-ttl",
        "--connect-timeout",
        "--header-timeout",
        "--client-idle-timeout",
        "--eject-for",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
        let env = format!(
            "GITBALL_{}",
            flag.trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase()
        );
        assert!(help.contains(&env), "--help lacks {env}");
    }
}

#[test]
fn routes_and_repos_are_exclusive() {
    let output = Command::new(BINARY)
        .args(["--routes", "r.toml", "--repos", "."])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn sign_prints_expiry_dot_signature() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "secret\n").unwrap();
    let output = Command::new(BINARY)
        .args(["sign", "--key-file"])
        .arg(&key)
        .args(["--repo", "acme/widget", "--ttl", "10m"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let (expiry, signature) = token.trim().split_once('.').unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!(
        (now + 590..=now + 610).contains(&expiry),
        "expiry {expiry} is not ~10 minutes from {now}"
    );
    // base64url without padding of a 32-byte HMAC: 43 characters.
    assert_eq!(signature.len(), 43);
    assert!(
        signature
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
}
