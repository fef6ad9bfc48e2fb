//! Flag values with units: sizes (`1048576`, `512KiB`, `64MiB`, `2GiB`)
//! and seconds (`30`, `0.5`). Both tiers' flags parse through these, so a
//! value means the same on either.

use std::time::Duration;

/// Parses a size: a byte count, or a number with KiB, MiB, GiB or TiB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 1048576, 512KiB, 64MiB, 2GiB)"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use KiB, MiB, GiB or TiB)"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Longest duration a flag takes: ten years. Anything longer means "never"
/// in practice, and added to the clock it could overflow it (attack:
/// `--generation-timeout 1e19` was taken, and every generation panicked).
pub const MAX_SECONDS: u64 = 10 * 366 * 24 * 3600;

/// Parses seconds, whole or fractional (`30`, `0.5`), up to
/// [`MAX_SECONDS`].
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    let duration = Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("{text:?} is not a valid number of seconds"))?;
    if duration > Duration::from_secs(MAX_SECONDS) {
        return Err(format!(
            "{text:?} is more than ten years ({MAX_SECONDS} seconds)"
        ));
    }
    Ok(duration)
}

/// [`parse_seconds`], more than zero: for a timeout that zero would turn
/// into "fail at once" (every connection, every download).
pub fn parse_positive_seconds(text: &str) -> Result<Duration, String> {
    let duration = parse_seconds(text)?;
    if duration.is_zero() {
        return Err(format!("{text:?}: must be more than 0 seconds"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("2GB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("-1").is_err());
        // docs/archiver.md, "Sizes and seconds" (mutation review: these
        // were not pinned): `B` and `TiB`, binary and case-sensitive, whole.
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("3TiB"), Ok(3 << 40));
        assert!(parse_size("1.5GiB").is_err());
        for unit in ["kib", "mib", "gib", "tib", "KB", "MB", "TB", "K", "G"] {
            assert!(parse_size(&format!("2{unit}")).is_err(), "2{unit}");
        }
    }

    #[test]
    fn seconds_parse_whole_and_fractional() {
        assert_eq!(parse_seconds("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        // Added to the clock, these overflowed it (attack).
        assert!(parse_seconds("1e19").is_err());
        assert!(parse_seconds(&(MAX_SECONDS + 1).to_string()).is_err());
        assert!(parse_seconds(&MAX_SECONDS.to_string()).is_ok());
        // At most ten years, whatever the constant says.
        assert!(parse_seconds(&(10 * 365 * 86_400).to_string()).is_ok());
        assert!(parse_seconds(&(11 * 365 * 86_400).to_string()).is_err());
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
        assert!(parse_positive_seconds("0").is_err());
        assert!(parse_positive_seconds("0.0").is_err());
        assert_eq!(
            parse_positive_seconds("0.5"),
            Ok(Duration::from_millis(500))
        );
    }
}
