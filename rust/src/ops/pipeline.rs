//! The worker pool of the bulk copies (convert, commit): items are examined (read, compared,
//! compressed) on every core and their results applied in order on the calling thread, with
//! at most a window of items in flight, so that memory stays bounded and the target is
//! written in guest order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex, PoisonError};

use crate::error::{Error, Result};

/// Worker threads for `threads` (0: one per core).
pub(crate) fn workers(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
    } else {
        threads
    }
}

/// Runs `work(i)` for every `i < n` on `workers` threads (never more than `2 * workers + 2`
/// items ahead of the one being applied) and hands each result to `apply(i, result)` on the
/// calling thread, in order. The first error, of a worker or of `apply`, stops the workers
/// and is returned (items after it are not applied).
pub(crate) fn run_in_order<T: Send>(
    n: usize,
    workers: usize,
    work: impl Fn(usize) -> Result<T> + Sync,
    mut apply: impl FnMut(usize, T) -> Result<()>,
) -> Result<()> {
    let window = 2 * workers + 2;
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let applied = (Mutex::new(0usize), Condvar::new());
    let (tx, rx) = mpsc::channel::<(usize, Result<T>)>();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, stop, applied, work) = (&next, &stop, &applied, &work);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || stop.load(Ordering::Relaxed) {
                    break;
                }
                // Bounded memory: at most `window` items ahead of the writer.
                let mut done = applied.0.lock().unwrap_or_else(PoisonError::into_inner);
                while i >= *done + window && !stop.load(Ordering::Relaxed) {
                    done = applied.1.wait(done).unwrap_or_else(PoisonError::into_inner);
                }
                drop(done);
                if tx.send((i, work(i))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<usize, Result<T>> = BTreeMap::new();
        let mut r = Ok(());
        for i in 0..n {
            let result = loop {
                if let Some(x) = pending.remove(&i) {
                    break x;
                }
                match rx.recv() {
                    Ok((k, x)) => {
                        pending.insert(k, x);
                    }
                    Err(_) => break Err(Error::InvalidArgument("the copy's workers stopped".into())),
                }
            };
            r = result.and_then(|x| apply(i, x));
            if r.is_err() {
                break;
            }
            *applied.0.lock().unwrap_or_else(PoisonError::into_inner) = i + 1;
            applied.1.notify_all();
        }
        stop.store(true, Ordering::Relaxed);
        applied.1.notify_all();
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_applied_in_order_and_the_first_error_stops() {
        let mut seen = Vec::new();
        run_in_order(
            100,
            3,
            |i| Ok(i * 2),
            |i, x| {
                seen.push((i, x));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, (0..100).map(|i| (i, i * 2)).collect::<Vec<_>>());
        let mut applied = 0;
        let r = run_in_order(
            100,
            2,
            |i| if i == 40 { Err(Error::InvalidArgument("boom".into())) } else { Ok(i) },
            |_, _| {
                applied += 1;
                Ok(())
            },
        );
        assert!(r.is_err());
        assert_eq!(applied, 40);
    }
}
