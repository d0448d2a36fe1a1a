//! `--disk path=IMG[,readonly]`: the virtio-blk disk of `ferry run`, a raw
//! image file, parsed into the VMM's typed config with an error that
//! names the bad part. The image itself (missing, read-only, locked by
//! another VM) is checked when the VM is built.

use std::path::PathBuf;
use std::str::FromStr;

use ferry_vmm::devices::block::device::BlockConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskFlagError {
    #[error("--disk needs path=IMG (e.g. --disk path=/var/lib/ferry/disk.img,readonly)")]
    MissingPath,
    #[error("--disk: empty path")]
    EmptyPath,
    #[error("--disk: unknown part {0:?} (want path=IMG and optionally readonly)")]
    UnknownPart(String),
    #[error("--disk: {0} given twice")]
    Twice(&'static str),
}

/// The parsed flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFlag(pub BlockConfig);

impl FromStr for DiskFlag {
    type Err = DiskFlagError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut path, mut readonly) = (None, false);
        for part in s.split(',') {
            if part == "readonly" {
                if readonly {
                    return Err(DiskFlagError::Twice("readonly"));
                }
                readonly = true;
            } else if let Some(p) = part.strip_prefix("path=") {
                if p.is_empty() {
                    return Err(DiskFlagError::EmptyPath);
                }
                if path.replace(PathBuf::from(p)).is_some() {
                    return Err(DiskFlagError::Twice("path"));
                }
            } else {
                return Err(DiskFlagError::UnknownPart(part.to_string()));
            }
        }
        let path = path.ok_or(DiskFlagError::MissingPath)?;
        Ok(DiskFlag(BlockConfig { path, readonly }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_path_and_readonly() {
        let d: DiskFlag = "path=/tmp/a.img".parse().unwrap();
        assert_eq!(d.0.path, PathBuf::from("/tmp/a.img"));
        assert!(!d.0.readonly);
        let d: DiskFlag = "readonly,path=b.img".parse().unwrap();
        assert!(d.0.readonly);
        assert_eq!(d.0.path, PathBuf::from("b.img"));
    }

    #[test]
    fn refuses_bad_flags_naming_the_part() {
        let bad = |s: &str| s.parse::<DiskFlag>().unwrap_err();
        assert_eq!(bad("readonly"), DiskFlagError::MissingPath);
        assert_eq!(bad(""), DiskFlagError::UnknownPart(String::new()));
        assert_eq!(bad("path="), DiskFlagError::EmptyPath);
        assert_eq!(bad("path=a,path=b"), DiskFlagError::Twice("path"));
        assert_eq!(
            bad("path=a,readonly,readonly"),
            DiskFlagError::Twice("readonly")
        );
        assert_eq!(
            bad("path=a,cache=none"),
            DiskFlagError::UnknownPart("cache=none".into())
        );
        assert!(bad("file=a").to_string().contains("\"file=a\""));
    }
}
