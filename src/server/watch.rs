//! Polling for edited files, shared by the policy and certificate reloads.
//!
//! Polling rather than inotify: it follows symbolic links and sees the
//! atomic `..data` symlink swap with which Kubernetes updates mounted
//! Secrets and ConfigMaps, works on every filesystem, and costs a few
//! `stat` calls per interval.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

/// What a file looks like from outside: path, size, modification time and
/// inode, all of the file a symbolic link points to.
pub(crate) type FileState = (PathBuf, u64, Option<SystemTime>, u64);

/// The state of each of `paths` (a missing file is left out, so its
/// return is a change too).
pub(crate) fn files(paths: &[&Path]) -> Vec<FileState> {
    paths
        .iter()
        .filter_map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            #[cfg(unix)]
            let inode = std::os::unix::fs::MetadataExt::ino(&meta);
            #[cfg(not(unix))]
            let inode = 0;
            Some((path.to_path_buf(), meta.len(), meta.modified().ok(), inode))
        })
        .collect()
}

/// Calls `fingerprint` every `interval` and `reload` when it changes. A
/// change is acted on once two polls in a row see the same new state, so
/// a file caught half-written is not loaded. Returns at `stop`; never
/// polls when `interval` is zero.
pub(crate) async fn on_change<T: PartialEq, F: Future<Output = ()>>(
    interval: Duration,
    stop: CancellationToken,
    mut fingerprint: impl FnMut() -> T,
    mut reload: impl FnMut() -> F,
) {
    if interval.is_zero() {
        return;
    }
    let mut loaded = fingerprint();
    let mut settling = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = fingerprint();
        if now == loaded {
            settling = None;
        } else if settling.as_ref() == Some(&now) {
            loaded = now;
            settling = None;
            reload().await;
        } else {
            settling = Some(now);
        }
    }
}
