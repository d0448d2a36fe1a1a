//! Runs code inside a named network namespace (/run/netns/NAME) without
//! moving the rest of the process: a fresh thread enters it with
//! setns(CLONE_NEWNET), which changes only that thread, and ends after the
//! closure. Sockets made there stay in that namespace wherever they are used.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use crate::NetlabError;

/// The path of namespace `ns`, refusing names that would reach outside
/// /run/netns.
pub(crate) fn netns_path(ns: &str) -> Result<PathBuf, NetlabError> {
    if ns.is_empty() || ns.contains('/') || ns == "." || ns == ".." {
        return Err(NetlabError::BadNamespaceName(ns.to_string()));
    }
    Ok(PathBuf::from("/run/netns").join(ns))
}

/// Runs `f` on a new thread inside network namespace `ns` and returns what
/// it returns. The calling thread's namespace does not change. A panic in
/// `f` is passed on to the caller.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T, NetlabError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let path = netns_path(ns)?;
    let file = File::open(&path).map_err(|source| NetlabError::EnterNetns {
        ns: ns.to_string(),
        path: path.display().to_string(),
        source,
    })?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns {ns}"))
            .spawn_scoped(scope, move || {
                move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network)).map_err(
                    |e| NetlabError::EnterNetns {
                        ns: ns.to_string(),
                        path: path.display().to_string(),
                        source: e.into(),
                    },
                )?;
                Ok(f())
            })
            .map_err(|source| NetlabError::Thread {
                ns: ns.to_string(),
                source,
            })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_names_outside_run_netns() {
        for bad in ["", "a/b", "..", "."] {
            assert!(matches!(
                in_netns(bad, || ()),
                Err(NetlabError::BadNamespaceName(_))
            ));
        }
    }

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let err = in_netns("netlab-no-such-namespace", || ()).unwrap_err();
        assert!(matches!(err, NetlabError::EnterNetns { .. }), "{err}");
        assert!(err.to_string().contains("netlab-no-such-namespace"));
    }
}
