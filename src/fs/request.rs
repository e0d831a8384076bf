//! Whether the current thread is serving a FUSE request.
//!
//! A FUSE notification (an invalidation) sent from inside a request can
//! deadlock on a lock that request holds in the kernel, so a publish caused
//! by a request (a write that adopts a token) must hand its invalidations to
//! another thread. The adapter marks every thread it serves a request on
//! (fuser's workers do nothing else), and the offload workers, which finish
//! requests, mark themselves: an explicit flag, never a guess from thread
//! names.

use std::cell::Cell;

thread_local! {
    static SERVES_REQUESTS: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as one that serves FUSE requests, for its whole life.
#[inline]
pub fn mark() {
    SERVES_REQUESTS.with(|c| c.set(true));
}

/// Whether this thread serves FUSE requests.
pub fn inside() -> bool {
    SERVES_REQUESTS.with(Cell::get)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_marked_threads_are_inside() {
        assert!(!super::inside());
        std::thread::spawn(|| {
            super::mark();
            assert!(super::inside());
        })
        .join()
        .unwrap();
        assert!(!super::inside());
    }
}
