//! Parsing sizes (`64M`, `1GiB`) and durations (`100ms`, `5s`) given on
//! command lines.

use std::time::Duration;

/// Parses a size in bytes: a plain number, or a number with one of the
/// suffixes `K`, `M`, `G`, `T` or `KiB`, `MiB`, `GiB`, `TiB` (both powers of
/// 1024; case-insensitive; an optional `B` is allowed after `K`/`M`/`G`/`T`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{text:?} is not a size (expected e.g. 4096, 64M, 1GiB)"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is too large"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {suffix:?} (use K, M, G, T or KiB, MiB, GiB, TiB)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v <= i64::MAX as u64)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a duration: a number with a unit `ms`, `s`, `m`, `h` (or `us`);
/// a bare number is seconds. Fractions are allowed (`0.5s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (expected e.g. 100ms, 5s, 1m)"))?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {unit:?} (use ms, s, m, h)"
            ));
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("{text:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        for bad in [
            "",
            "M",
            "1X",
            "-1",
            "1.5M",
            "99999999999T",
            "18446744073709551616",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        for bad in ["", "ms", "1x", "-1s", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
