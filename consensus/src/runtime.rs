//! The async runtime openraft runs on: tokio, with the randomness openraft draws (election
//! timeouts) coming from a per-server seeded generator when one is installed.
//!
//! openraft asks its runtime for randomness through a static `thread_rng()`, with no handle to
//! the server it is for. Under the simulator all servers share one thread, so a thread-local
//! generator would interleave their draws and tie each server's timeouts to the others'. Instead
//! the generator travels with the server's tasks as a tokio task-local: [`with_seeded_rng`]
//! installs it around the future that creates the `Raft`, and [`MeshRuntime::spawn`] carries it
//! into every task openraft spawns from there. Outside such a scope (production servers),
//! draws come from the OS-seeded thread generator, as with openraft's own tokio runtime.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

tokio::task_local! {
    static SERVER_RNG: SeededRng;
}

/// A seeded generator shared by one server's tasks.
#[derive(Debug, Clone)]
pub struct SeededRng(Arc<Mutex<StdRng>>);

impl SeededRng {
    /// The generator for one server of a seeded run.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(StdRng::seed_from_u64(seed))))
    }

    fn with<T>(&self, draw: impl FnOnce(&mut StdRng) -> T) -> T {
        // A panic while drawing leaves the generator valid: keep using it.
        let mut rng = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        draw(&mut rng)
    }
}

/// Runs `future` (and every task openraft spawns from it) with `rng` as its randomness.
pub async fn with_seeded_rng<F: Future>(rng: SeededRng, future: F) -> F::Output {
    SERVER_RNG.scope(rng, future).await
}

/// The generator openraft gets from [`MeshRuntime::thread_rng`].
#[derive(Debug)]
pub enum MeshRng {
    /// The server's seeded generator.
    Seeded(SeededRng),
    /// The OS-seeded thread generator.
    Thread(rand::rngs::ThreadRng),
}

impl RngCore for MeshRng {
    fn next_u32(&mut self) -> u32 {
        match self {
            Self::Seeded(rng) => rng.with(|rng| rng.next_u32()),
            Self::Thread(rng) => rng.next_u32(),
        }
    }

    fn next_u64(&mut self) -> u64 {
        match self {
            Self::Seeded(rng) => rng.with(|rng| rng.next_u64()),
            Self::Thread(rng) => rng.next_u64(),
        }
    }

    fn fill_bytes(&mut self, destination: &mut [u8]) {
        match self {
            Self::Seeded(rng) => rng.with(|rng| rng.fill_bytes(destination)),
            Self::Thread(rng) => rng.fill_bytes(destination),
        }
    }

    fn try_fill_bytes(&mut self, destination: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(destination);
        Ok(())
    }
}

/// tokio with per-server seeded randomness; time is tokio's, which the simulator drives.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MeshRuntime;

impl AsyncRuntime for MeshRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = tokio::time::Instant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = MeshRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;

    #[allow(clippy::disallowed_methods)] // This is the seam through which openraft spawns.
    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        match SERVER_RNG.try_with(SeededRng::clone) {
            Ok(rng) => tokio::spawn(SERVER_RNG.scope(rng, future)),
            Err(_) => tokio::spawn(future),
        }
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    #[allow(clippy::disallowed_methods)] // The seam: seeded under the simulator, OS-seeded else.
    fn thread_rng() -> Self::ThreadLocalRng {
        match SERVER_RNG.try_with(SeededRng::clone) {
            Ok(rng) => MeshRng::Seeded(rng),
            Err(_) => MeshRng::Thread(rand::thread_rng()),
        }
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(sender), receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[tokio::test]
    async fn draws_inside_a_scope_follow_the_seed_also_in_spawned_tasks() {
        let draws = |seed| async move {
            with_seeded_rng(SeededRng::new(seed), async {
                let first: u64 = MeshRuntime::thread_rng().r#gen();
                let second = MeshRuntime::spawn(async { MeshRuntime::thread_rng().r#gen::<u64>() })
                    .await
                    .unwrap_or_default();
                (first, second)
            })
            .await
        };
        let (first, second) = draws(7).await;
        assert_eq!(draws(7).await, (first, second));
        assert_ne!(first, second, "the spawned task continues the same stream");
        assert_ne!(draws(8).await, (first, second));
        assert!(matches!(MeshRuntime::thread_rng(), MeshRng::Thread(_)));
    }
}
