//! Human durations in the config file: "250ms", "30s", "5m", "1h".
//!
//! Written by hand rather than pulling a crate: the grammar is one number and one unit.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses "250ms", "30s", "5m", "1h" (a whole number and a unit).
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {text:?} has no unit (use ms, s, m or h)"))?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("duration {text:?} must start with a whole number"));
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("duration {text:?} is too large"))?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "duration {text:?} has unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {text:?} is too large"))
}

/// serde adapter: `#[serde(deserialize_with = "duration::deserialize")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// serde adapter for optional durations.
pub fn deserialize_opt<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let text = Option::<String>::deserialize(deserializer)?;
    text.map(|t| parse(&t).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "10",
            "ms",
            "1.5s",
            "10 parsecs",
            "-1s",
            "99999999999999999999s",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
