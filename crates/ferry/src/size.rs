//! Human sizes on the command line: `512M`, `1G`, `1GiB`, `64MiB`. Units are
//! binary; a bare number is refused, because "1024" could mean bytes or MiB.

pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("'{text}' is not a size (expected e.g. 512M or 1G)"));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" => {
            return Err(format!(
                "'{text}' has no unit (write e.g. {text}M or {text}G)"
            ))
        }
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "'{text}' has an unknown unit '{unit}' (use K, M, G or T)"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// A new cap for a running migration: a rate, or `0` / `unlimited` for
/// none.
pub fn parse_cap(text: &str) -> Result<u64, String> {
    match text.trim() {
        "0" | "unlimited" | "uncapped" => Ok(0),
        _ => parse_rate(text),
    }
}

/// A rate: a size per second, `200MiB/s`, `2GiB/s` (the `/s` may be left out).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let size = t.strip_suffix("/s").unwrap_or(t);
    let bytes = parse_size(size).map_err(|e| format!("{e} (a rate is e.g. 200MiB/s)"))?;
    if bytes == 0 {
        return Err(format!(
            "'{text}' would send nothing; leave --bandwidth out for no cap"
        ));
    }
    Ok(bytes)
}

/// Bytes as MiB or GiB for people.
pub fn show_size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64mib"), Ok(64 << 20));
    }

    #[test]
    fn bad_sizes_say_why() {
        assert!(parse_size("").unwrap_err().contains("not a size"));
        assert!(parse_size("G").unwrap_err().contains("not a size"));
        assert!(parse_size("1024").unwrap_err().contains("no unit"));
        assert!(parse_size("1X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999999999999G")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }
}
