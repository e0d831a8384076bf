//! What the minting sources (databricks, oauth) share: single-flight
//! bookkeeping for `tokenfs rotate`, and the wait for the next command or
//! the next deadline on a source thread.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};

/// Single flight: one rotation per credential at a time; callers that
/// arrive while one runs (scheduled or requested) wait for its result
/// instead of starting another.
#[derive(Default)]
pub struct Flight {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    last_id: u64,
    running: Option<u64>,
    finished: u64,
    result: Option<Result<u64, String>>,
}

impl Flight {
    /// Joins the running rotation, or starts one with `start(id)` (which
    /// sends it to the source thread), then waits up to `wait` for its
    /// result. `what` names the rotation in a timeout ("refresh").
    pub fn join(
        &self,
        start: impl FnOnce(u64) -> Result<(), String>,
        wait: Duration,
        what: &str,
    ) -> Result<u64, String> {
        let mut st = self.state.lock();
        let id = match st.running {
            Some(id) => id,
            None => {
                st.last_id += 1;
                let id = st.last_id;
                start(id)?;
                st.running = Some(id);
                id
            }
        };
        let deadline = Instant::now() + wait;
        while st.finished < id {
            if self.done.wait_until(&mut st, deadline).timed_out() {
                return Err(format!("{what} still running after {wait:?}"));
            }
        }
        st.result.clone().unwrap_or_else(|| Err("no result".into()))
    }

    /// The source thread starts a rotation of its own: joins the id
    /// callers wait for, if any.
    pub fn begin(&self) -> u64 {
        let mut st = self.state.lock();
        match st.running {
            Some(id) => id,
            None => {
                st.last_id += 1;
                st.running = Some(st.last_id);
                st.last_id
            }
        }
    }

    /// A rotation ended: every caller waiting for `id` gets `result`.
    pub fn finish(&self, id: u64, result: Result<u64, String>) {
        let mut st = self.state.lock();
        st.finished = st.finished.max(id);
        if st.running == Some(id) {
            st.running = None;
        }
        st.result = Some(result);
        self.done.notify_all();
    }

    /// Whether rotation `id` has ended (a scheduled one may have served it).
    pub fn finished(&self, id: u64) -> bool {
        self.state.lock().finished >= id
    }
}

/// The next command for a source thread: `Ok(None)` when `deadline` came
/// first, `Err(())` when every sender is gone (the thread should end).
pub fn next_command<T>(rx: &Receiver<T>, deadline: Option<SystemTime>) -> Result<Option<T>, ()> {
    match deadline {
        Some(at) => {
            let wait = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            match rx.recv_timeout(wait) {
                Ok(c) => Ok(Some(c)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(()),
            }
        }
        None => rx.recv().map(Some).map_err(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_callers_share_one_rotation() {
        let f = Arc::new(Flight::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let (f, tx) = (f.clone(), tx.clone());
                std::thread::spawn(move || {
                    f.join(
                        |id| tx.send(id).map_err(|e| e.to_string()),
                        Duration::from_secs(5),
                        "test",
                    )
                })
            })
            .collect();
        let id = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        f.finish(id, Ok(7));
        for c in callers {
            assert_eq!(c.join().unwrap(), Ok(7));
        }
        assert!(rx.try_recv().is_err(), "one rotation started");
        assert!(f.finished(id));
    }

    #[test]
    fn next_command_times_out_and_sees_disconnects() {
        let (tx, rx) = std::sync::mpsc::channel::<u8>();
        let soon = Some(SystemTime::now() + Duration::from_millis(5));
        assert_eq!(next_command(&rx, soon), Ok(None));
        tx.send(1).unwrap();
        assert_eq!(next_command(&rx, None), Ok(Some(1)));
        drop(tx);
        assert_eq!(next_command(&rx, None), Err(()));
    }
}
