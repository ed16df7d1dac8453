//! Replacing files that other processes read while we run: `dev`'s state dir (SA tokens, keys,
//! certificates, `dev.json`) and the kube emulator's. A file is written whole under a fresh
//! temporary name and renamed over its target, so a reader sees the old content or the new,
//! never half; a private file is created 0600, so no moment exists in which its secret is
//! readable by others (a `chmod` after writing would leave one).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How often the files the proxy reloads (bindings, issuer keys, certificates) are checked for
/// changes.
pub const RELOAD_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// Owner read/write only: private keys, bearer tokens, SA tokens.
pub const PRIVATE: u32 = 0o600;
/// Readable by all (before the umask): certificates, public documents, descriptions.
pub const PUBLIC: u32 = 0o644;

/// Creates or replaces `path` with `bytes`, readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes, PRIVATE)
}

/// Creates or replaces `path` with `bytes`, readable by all.
pub fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes, PUBLIC)
}

/// Creates or replaces `path` atomically; the new file has `mode` (less the umask) from the
/// moment it exists. The error names the file.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    put(path, bytes, mode, |tmp| std::fs::rename(tmp, path))
}

/// Creates `path` atomically like [`replace`], but never over an existing file: an
/// `AlreadyExists` error then (e.g. a key that may already be published).
pub fn create(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    put(path, bytes, mode, |tmp| {
        // A link fails if the name exists, atomically; the temporary name then goes.
        std::fs::hard_link(tmp, path)?;
        std::fs::remove_file(tmp)
    })
}

/// Writes `bytes` whole under a fresh temporary name beside `path`, then `place`s it; on any
/// failure the temporary file is removed and the error names `path`.
fn put(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    place: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = temporary_name(path);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            // On disk before it takes the name, so a crash leaves the old file or the new one.
            f.sync_all()
        })
        .and_then(|()| place(&tmp));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
    })
}

/// Calls `reload` whenever the contents of any of `paths` change, looked at every `period`,
/// until `stop`. Mounted ConfigMaps and Secrets change by a symlink swap that a watch on the
/// file itself misses; reading the contents sees every kind of update. A file that becomes
/// unreadable counts as a change once, so `reload` can report it and keep what it has.
pub fn watch_contents(
    paths: Vec<PathBuf>,
    period: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
    reload: impl FnMut(),
) -> impl std::future::Future<Output = ()> {
    // Taken now, not when the future first runs: an edit made in between is still a change.
    let seen = snapshot(&paths);
    watch_contents_since(paths, seen, period, stop, reload)
}

/// The contents of `paths` now (`None` for one that cannot be read), for
/// [`watch_contents_since`]: taken before a file is loaded, no edit after the load is missed.
pub fn snapshot(paths: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    paths.iter().map(|p| std::fs::read(p).ok()).collect()
}

/// [`watch_contents`], comparing with contents `seen` earlier.
pub async fn watch_contents_since(
    paths: Vec<PathBuf>,
    mut seen: Vec<Option<Vec<u8>>>,
    period: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
    mut reload: impl FnMut(),
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let now = snapshot(&paths);
        if now != seen {
            seen = now;
            reload();
        }
    }
}

/// A name beside `path` (same directory, so the rename stays on one file system) that no
/// other writer, in this process or another, uses at the same time.
fn temporary_name(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_private_file_replacing_a_readable_one_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "old").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let before = std::fs::metadata(&f).unwrap().ino();
        write_private(&f, b"new").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"new");
        assert_eq!(mode(&f), 0o600);
        // Replaced, not rewritten in place: a reader holding the old file keeps the old bytes.
        assert_ne!(std::fs::metadata(&f).unwrap().ino(), before);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_of_contents_reloads_once_and_a_stop_ends_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bindings.yaml");
        std::fs::write(&f, "a").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = tokio_util::sync::CancellationToken::new();
        let period = std::time::Duration::from_secs(1);
        let watch = tokio::spawn(watch_contents(
            vec![f.clone()],
            period,
            stop.clone(),
            move || tx.send(()).unwrap(),
        ));
        tokio::time::sleep(period * 3).await;
        assert!(rx.try_recv().is_err(), "unchanged contents reloaded");
        // Same length, same mtime second: only the contents differ.
        std::fs::write(&f, "b").unwrap();
        tokio::time::sleep(period * 3).await;
        assert!(rx.try_recv().is_ok(), "a change was not seen");
        assert!(rx.try_recv().is_err(), "one change reloaded more than once");
        std::fs::remove_file(&f).unwrap();
        tokio::time::sleep(period * 3).await;
        assert!(rx.try_recv().is_ok(), "a vanished file was not reported");
        assert!(rx.try_recv().is_err());
        stop.cancel();
        watch.await.unwrap();
    }

    #[test]
    fn create_never_replaces_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cluster.key");
        create(&f, b"first", PRIVATE).unwrap();
        assert_eq!(mode(&f), 0o600);
        let e = create(&f, b"second", PRIVATE).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("cluster.key"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"first");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_names_the_file_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("missing-dir/key");
        let e = write_private(&f, b"x").unwrap_err();
        assert!(e.to_string().contains("missing-dir/key"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
