//! Requests that wait on the disk (an `fsync`, a managed file's atomic save,
//! a large `fallocate` or `copy_file_range`) run here and reply from here:
//! the core hands them back as `Step::Later`, and the adapter runs them.
//!
//! Why: each mount has only two FUSE request threads (see `daemon::mount`),
//! and neither may block, or a config read would queue behind an agent's
//! `fsync`. The kernel matches replies by request id, so a reply may come
//! from any thread.

use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tracing::warn;

type Job = Box<dyn FnOnce() + Send>;

/// Worker threads shared by every mount; two, so one long `fsync` does not
/// hold up a managed file's save.
const WORKERS: usize = 2;

/// The name prefix of the workers (they mark themselves as serving requests,
/// see `fs::request`: they hold a request open while they work).
const THREAD_PREFIX: &str = "request-offload-";

/// Runs `job` on a worker; inline if no worker could be started.
pub fn run(job: impl FnOnce() + Send + 'static) {
    match queue() {
        Some(tx) => {
            if let Err(mpsc::SendError(job)) = tx.send(Box::new(job)) {
                job();
            }
        }
        None => job(),
    }
}

fn queue() -> Option<&'static mpsc::Sender<Job>> {
    static TX: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..WORKERS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{THREAD_PREFIX}{i}"))
                .spawn(move || {
                    super::request::mark();
                    loop {
                        // The lock is held only while waiting for a job.
                        let job = rx.lock().recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => warn!("cannot start an offload thread: {e}"),
            }
        }
        (started > 0).then_some(tx)
    })
    .as_ref()
}
