//! A temporary directory for the block device's unit tests, removed when
//! dropped (also when the test fails).

use std::path::{Path, PathBuf};

pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("ferry-vmm-block-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test's scratch directory");
        Scratch { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
