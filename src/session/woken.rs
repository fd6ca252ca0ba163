//! Two futures in one task, each polled only when its own waker fired.
//!
//! A session's two directions (client → upstream, upstream → client) run in one task, and
//! `tokio::select!` polls every branch at every wake-up. Each transaction wakes the task twice
//! (the client's message, then the server's answer), so each direction was polled once for
//! nothing per transaction: a socket read that returns pending, and on the server side the
//! select over the alarm, the drain watch and the socket. That was about a tenth of the
//! relay's instructions for a prepared statement. Here each direction gets a waker of its own
//! that marks it and wakes the task; a wake-up polls only the marked ones.
//!
//! Invariant: a direction is polled after every wake of its own waker (the mark is set before
//! the task is woken and cleared just before the poll), so no wake-up is lost; a direction is
//! never polled with the task's waker, so it never misses one either.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

/// One direction's waker: marks it, then wakes the task.
struct Mark {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Mark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

struct Direction<'a, F> {
    future: Pin<&'a mut F>,
    mark: Arc<Mark>,
    waker: Waker,
}

impl<'a, F: Future> Direction<'a, F> {
    fn new(future: Pin<&'a mut F>) -> Self {
        // Marked: the first poll polls it.
        let mark = Arc::new(Mark { woken: AtomicBool::new(true), task: AtomicWaker::new() });
        Direction { future, waker: Waker::from(Arc::clone(&mark)), mark }
    }

    fn poll_if_woken(&mut self, task: &Waker) -> Poll<F::Output> {
        // The task's waker first: a wake between the check and the poll then still wakes it.
        self.mark.task.register(task);
        if !self.mark.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        self.future.as_mut().poll(&mut Context::from_waker(&self.waker))
    }
}

/// The output of whichever of `first` and `second` finishes first (`second`'s through
/// `second_as`), `first` polled first when both were woken (as `tokio::select!` with `biased`).
/// The mapping is an argument rather than an `async` block around `second`: such a block keeps
/// the future it awaits twice (the captured one and the awaited one), which made every idle
/// session 4 KiB larger.
pub(super) async fn first_to_finish<T, A, B>(
    first: Pin<&mut A>,
    second: Pin<&mut B>,
    second_as: impl Fn(B::Output) -> T,
) -> T
where
    A: Future<Output = T>,
    B: Future,
{
    let (mut a, mut b) = (Direction::new(first), Direction::new(second));
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(out) = a.poll_if_woken(cx.waker()) {
            return Poll::Ready(out);
        }
        b.poll_if_woken(cx.waker()).map(&second_as)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// The waker a pending `Gate` was last polled with.
    type Kept = Arc<std::sync::Mutex<Option<Waker>>>;

    /// Counts its polls; ready once `open` is set, pending (waking nobody) before.
    struct Gate {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waker: Kept,
    }

    impl Future for Gate {
        type Output = &'static str;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<&'static str> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready("done");
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn gate() -> (Gate, Arc<AtomicUsize>, Arc<AtomicBool>, Kept) {
        let (polls, open, waker) = (Arc::default(), Arc::default(), Arc::default());
        let g = Gate { polls: Arc::clone(&polls), open: Arc::clone(&open), waker: Arc::clone(&waker) };
        (g, polls, open, waker)
    }

    #[tokio::test]
    async fn a_wake_polls_only_the_direction_it_was_for_and_none_is_lost() {
        let (a, a_polls, a_open, a_waker) = gate();
        let (b, b_polls, _b_open, b_waker) = gate();
        tokio::pin!(a, b);
        let race = first_to_finish(a, b, |x| x);
        tokio::pin!(race);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(race.as_mut().poll(&mut cx).is_pending());
        assert_eq!((a_polls.load(Ordering::SeqCst), b_polls.load(Ordering::SeqCst)), (1, 1));
        // A wake-up for nobody's waker (the task's own) polls neither.
        assert!(race.as_mut().poll(&mut cx).is_pending());
        assert_eq!((a_polls.load(Ordering::SeqCst), b_polls.load(Ordering::SeqCst)), (1, 1));
        // b's waker: only b is polled.
        b_waker.lock().unwrap().take().unwrap().wake();
        assert!(race.as_mut().poll(&mut cx).is_pending());
        assert_eq!((a_polls.load(Ordering::SeqCst), b_polls.load(Ordering::SeqCst)), (1, 2));
        // a opens and wakes: a finishes the race.
        a_open.store(true, Ordering::SeqCst);
        a_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(race.as_mut().poll(&mut cx), Poll::Ready("done"));
        assert_eq!((a_polls.load(Ordering::SeqCst), b_polls.load(Ordering::SeqCst)), (2, 2));
    }

    #[tokio::test]
    async fn the_task_is_woken_through_a_directions_waker() {
        let (a, _, a_open, a_waker) = gate();
        let (b, _, _, _) = gate();
        let opener = tokio::spawn(async move {
            tokio::task::yield_now().await;
            a_open.store(true, Ordering::SeqCst);
            let waker = a_waker.lock().unwrap().take();
            waker.unwrap().wake();
        });
        tokio::pin!(a, b);
        assert_eq!(first_to_finish(a, b, |x| x).await, "done");
        opener.await.unwrap();
    }
}
