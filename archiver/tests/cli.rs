//! The binary's command line, run as a process. (Also makes `cargo test`
//! build the `gitball-archiver` binary that the end-to-end tests in `tests/`
//! start.)

use std::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_gitball-archiver");

#[test]
fn help_names_every_flag_and_its_environment_variable() {
    let output = Command::new(BINARY).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--listen",
        "--repos",
        "--cache-dir",
        "--cache-max-bytes",
        "--max-generations",
        "--queue-timeout",
        "--generation-timeout",
        "--max-archive-bytes",
        "--token-file",
        "--gzip-level",
        "--zstd-level",
        "--shutdown-grace",
        "--log-format",
        "--git",
        "--require-reachable",
        "--generation-memory-limit",
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
fn missing_repos_is_a_clear_usage_error() {
    let output = Command::new(BINARY)
        .env_remove("GITBALL_REPOS")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--repos"), "{stderr}");
}

#[test]
fn bad_size_is_rejected_with_examples() {
    let output = Command::new(BINARY)
        .args(["--repos", ".", "--cache-max-bytes", "2GB"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("GiB"), "{stderr}");
}
