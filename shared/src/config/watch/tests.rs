use super::*;
use parking_lot::Mutex;

const GOOD: &str = "trustDomain: cluster.local\nnamespaces: [{name: shop}]\n";
const GOOD2: &str = "trustDomain: example.org\nnamespaces: [{name: shop}]\n";
const BAD: &str = "trustDomain: cluster.local\nbogus: 1\n";

/// Replaces `path` atomically, as config management does: a reader never sees a
/// half-written file (`std::fs::write` truncates first, so a poll could read it empty).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A watcher on a temporary file, polling every 10 ms, recording every outcome.
struct Harness {
    _dir: tempfile::TempDir,
    path: PathBuf,
    rx: watch::Receiver<Arc<Config>>,
    seen: Arc<Mutex<Vec<ReloadOutcome>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn start(initial: &str, limits: Limits) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, initial).expect("write");
        let tx = load_initial(&path, &limits).expect("initial config loads");
        let rx = tx.subscribe();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(watch_file_with(
            path.clone(),
            tx,
            move |o| log.lock().push(o),
            WatchSettings {
                every: Duration::from_millis(10),
                limits,
            },
        ));
        Harness {
            _dir: dir,
            path,
            rx,
            seen,
            task,
        }
    }

    /// Waits until `n` outcomes were reported.
    async fn wait(&self, n: usize) {
        for _ in 0..1000 {
            if self.seen.lock().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("no reload reported: {:?}", self.seen.lock());
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn applies_good_changes_and_keeps_the_last_good_one() {
    let mut h = Harness::start(GOOD, Limits::default());
    replace(&h.path, BAD);
    h.wait(1).await;
    assert_eq!(h.seen.lock()[0], ReloadOutcome::Refused);
    assert_eq!(h.rx.borrow_and_update().trust_domain, "cluster.local");

    replace(&h.path, GOOD2);
    tokio::time::timeout(Duration::from_secs(5), h.rx.changed())
        .await
        .expect("change published")
        .expect("sender alive");
    assert_eq!(h.rx.borrow().trust_domain, "example.org");
    assert_eq!(h.seen.lock()[1], ReloadOutcome::Applied);
}

#[tokio::test]
async fn oversized_and_deep_files_are_refused_once_each_and_the_last_good_stays() {
    let limits = Limits {
        max_bytes: 4096,
        max_depth: 16,
    };
    let h = Harness::start(GOOD, limits);
    // Larger than the cap: refused from its size alone.
    let big = format!("{GOOD}# {}\n", "x".repeat(8192));
    replace(&h.path, &big);
    h.wait(1).await;
    // Nested deeper than the cap, in a small file.
    let deep = format!("{GOOD}x: {}{}\n", "[".repeat(100), "]".repeat(100));
    replace(&h.path, &deep);
    h.wait(2).await;
    // Unchanged bad files are not re-read, so not reported again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        *h.seen.lock(),
        [ReloadOutcome::Refused, ReloadOutcome::Refused],
        "each bad version is reported once"
    );
    assert_eq!(h.rx.borrow().trust_domain, "cluster.local");

    replace(&h.path, GOOD2);
    h.wait(3).await;
    assert_eq!(h.seen.lock()[2], ReloadOutcome::Applied);
    assert_eq!(h.rx.borrow().trust_domain, "example.org");
}

#[tokio::test]
async fn an_unchanged_rewrite_is_not_a_reload_and_a_missing_file_is_reported_once() {
    let h = Harness::start(GOOD, Limits::default());
    // Same bytes, new metadata: read and hashed, but not parsed or reported.
    replace(&h.path, GOOD);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.seen.lock().is_empty(), "{:?}", h.seen.lock());

    std::fs::remove_file(&h.path).expect("remove");
    h.wait(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*h.seen.lock(), [ReloadOutcome::Refused]);
    // Back with the content in force: nothing changed, nothing to report.
    replace(&h.path, GOOD);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*h.seen.lock(), [ReloadOutcome::Refused]);
    assert_eq!(h.rx.borrow().trust_domain, "cluster.local");
}

#[test]
fn a_file_modified_recently_is_read_again_until_its_mtime_is_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, GOOD).expect("write");
    let tx = load_initial(&path, &Limits::default()).expect("loads");
    let _rx = tx.subscribe();
    let mut w = Watcher::new(path.clone(), tx, |_| {}, Limits::default());
    w.poll(false);
    // Just written: its metadata is not trusted yet.
    assert_eq!(w.seen, None);
    // Backdate it past the racy window: now a poll records it and later polls skip reading.
    let old = SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(old))
        .expect("set mtime");
    w.poll(false);
    assert!(w.seen.is_some());
}
