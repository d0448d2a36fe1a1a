//! What a host or operator name may be: one DNS label, so that it can be a
//! certificate's DNS name, a directory name and part of a `ferry://` URI.

/// A name that cannot name a host or an operator, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` is not a valid name: {reason} (use 1-63 letters, digits and inner hyphens, e.g. `host-b2`)")]
pub struct NameError {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks that `name` is one DNS label: 1 to 63 ASCII letters, digits and
/// hyphens, neither starting nor ending with a hyphen.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let fail = |reason| {
        Err(NameError {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > 63 {
        return fail("it is longer than 63 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return fail("it has a character other than a letter, a digit or `-`");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return fail("it starts or ends with `-`");
    }
    Ok(())
}

/// Checks that `name` is a DNS name made of valid labels separated by dots
/// (an extra `--dns` name for a host certificate).
pub fn validate_dns_name(name: &str) -> Result<(), NameError> {
    if name.len() > 253 {
        return Err(NameError {
            name: name.to_string(),
            reason: "it is longer than 253 characters",
        });
    }
    for label in name.split('.') {
        validate_name(label).map_err(|e| NameError {
            name: name.to_string(),
            reason: e.reason,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for good in ["hostB", "host-b2", "a", "0", &"x".repeat(63)] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a.b",
            "a b",
            "a/b",
            "ä",
            "../x",
            &"x".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_dns_name("b.example.org").is_ok());
        assert!(validate_dns_name("b..org").is_err());
        assert!(validate_dns_name("*.org").is_err());
    }
}
