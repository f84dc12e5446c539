//! Values loaded from files and reloaded when the files change (the token
//! file, the TLS certificate and key): a rotated Kubernetes Secret takes
//! effect without a restart, and a broken rotation never replaces a working
//! value.

use std::fmt::Display;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Publishes `initial`, then every `every` re-reads `paths` and, when any of
/// them changed, publishes what `load` makes of them. A file that cannot be
/// read or a `load` that fails is logged and the previous value stays.
/// Stops once every receiver is gone. Needs a Tokio runtime.
pub fn watch_files<T, E, L>(
    what: &'static str,
    paths: Vec<PathBuf>,
    initial: T,
    every: Duration,
    load: L,
) -> watch::Receiver<Arc<T>>
where
    T: Send + Sync + 'static,
    E: Display,
    L: Fn() -> Result<T, E> + Send + 'static,
{
    let (tx, rx) = watch::channel(Arc::new(initial));
    // What `initial` was loaded from, as near to that load as can be.
    let mut last: Option<Vec<Vec<u8>>> = paths.iter().map(|p| std::fs::read(p).ok()).collect();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(every) => {}
            }
            let now = match read_all(&paths).await {
                Ok(now) => now,
                Err((path, e)) => {
                    tracing::error!(what, path = %path.display(), error = %e, "unreadable; the previous value stays");
                    continue;
                }
            };
            if last.as_ref() == Some(&now) {
                continue;
            }
            last = Some(now);
            match load() {
                Ok(value) => {
                    tracing::info!(what, "reloaded");
                    tx.send_replace(Arc::new(value));
                }
                Err(e) => {
                    tracing::error!(what, error = %e, "changed but invalid; the previous value stays");
                }
            }
        }
    });
    rx
}

/// The bytes of every path, or the first path that could not be read.
async fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, (PathBuf, std::io::Error)> {
    let mut contents = Vec::with_capacity(paths.len());
    for path in paths {
        contents.push(tokio::fs::read(path).await.map_err(|e| (path.clone(), e))?);
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_file_is_reloaded_and_a_broken_one_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let load_path = path.clone();
        let mut rx = watch_files(
            "test number",
            vec![path.clone()],
            1u32,
            Duration::from_millis(20),
            move || {
                std::fs::read_to_string(&load_path)
                    .map_err(|e| e.to_string())?
                    .trim()
                    .parse::<u32>()
                    .map_err(|e| e.to_string())
            },
        );
        // Writes `text` and waits for the value it loads to be published.
        async fn publish(
            path: &std::path::Path,
            text: &str,
            rx: &mut watch::Receiver<Arc<u32>>,
        ) -> u32 {
            std::fs::write(path, text).unwrap();
            tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .unwrap()
                .unwrap();
            **rx.borrow_and_update()
        }
        assert_eq!(publish(&path, "2", &mut rx).await, 2);
        std::fs::write(&path, "not a number").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !rx.has_changed().unwrap(),
            "a broken file must not replace the value"
        );
        assert_eq!(**rx.borrow(), 2);
        assert_eq!(publish(&path, "3", &mut rx).await, 3);
    }
}
