//! In-process collectives: every rank is a thread, tensors are exchanged through shared slots.
//! Sums are taken in rank order on every rank, so results are identical everywhere and from run
//! to run. A rank that fails calls [`Collective::abort`]; every other rank's current or next call
//! then returns an error naming it, and a call that waits longer than the timeout errors with
//! the ranks that never arrived (never a silent hang).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::Collective;
use crate::{Error, Result};

struct State {
    /// One slot per rank for the operation in progress.
    slots: Vec<Option<Tensor>>,
    /// Ranks that have deposited in the current round.
    arrived: usize,
    present: Vec<bool>,
    /// Ranks that have read the current round's result.
    departed: usize,
    /// Incremented when a round's slots are complete (readers wait for it).
    generation: u64,
    failed: Option<(usize, String)>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cond: Condvar,
}

/// One rank's handle; [`ThreadGroup::new`] makes all of them.
#[derive(Clone)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// Handles for ranks `0..world`, to move into one thread each.
    pub fn new(world: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                slots: vec![None; world],
                arrived: 0,
                present: vec![false; world],
                departed: 0,
                generation: 0,
                failed: None,
            }),
            cond: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.shared
            .state
            .lock()
            .map_err(|_| Error::Distributed("collective state poisoned by a panicking rank".into()))
    }

    fn failed(&self, st: &State) -> Result<()> {
        match &st.failed {
            Some((r, msg)) => Err(Error::Distributed(format!("rank {r} failed: {msg}"))),
            None => Ok(()),
        }
    }

    /// Deposits `t`, waits for every rank, and returns all ranks' tensors in rank order.
    fn exchange(&self, t: Option<&Tensor>) -> Result<Vec<Option<Tensor>>> {
        let sh = &self.shared;
        let deadline = Instant::now() + sh.timeout;
        let mut st = self.lock()?;
        // A fast rank waits until every rank has read the previous round's result.
        while st.arrived == sh.world {
            self.failed(&st)?;
            st = self.wait(st, deadline, "the previous collective")?;
        }
        self.failed(&st)?;
        st.slots[self.rank] = t.cloned();
        st.present[self.rank] = true;
        st.arrived += 1;
        let generation = st.generation;
        if st.arrived == sh.world {
            st.generation += 1;
            sh.cond.notify_all();
        }
        while st.generation == generation {
            self.failed(&st)?;
            st = self.wait(st, deadline, "a collective")?;
        }
        let out = st.slots.clone();
        st.departed += 1;
        if st.departed == sh.world {
            st.slots = vec![None; sh.world];
            st.present = vec![false; sh.world];
            st.arrived = 0;
            st.departed = 0;
            sh.cond.notify_all();
        }
        Ok(out)
    }

    fn wait<'a>(
        &self,
        st: std::sync::MutexGuard<'a, State>,
        deadline: Instant,
        what: &str,
    ) -> Result<std::sync::MutexGuard<'a, State>> {
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<usize> = (0..self.shared.world).filter(|&r| !st.present[r]).collect();
            return Err(Error::Distributed(format!(
                "rank {}: timed out after {:?} waiting for {what}; ranks not arrived: {missing:?}",
                self.rank, self.shared.timeout
            )));
        }
        let (st, _) = self
            .shared
            .cond
            .wait_timeout(st, deadline - now)
            .map_err(|_| Error::Distributed("collective state poisoned".into()))?;
        Ok(st)
    }

    fn sum_in_rank_order(parts: &[Option<Tensor>]) -> Result<Tensor> {
        sum_in_rank_order(parts)
    }
}

/// `parts[0] + parts[1] + …`, left to right: the one summation order of every CPU backend, so
/// that threads and processes give bit-identical results.
pub(crate) fn sum_in_rank_order(parts: &[Option<Tensor>]) -> Result<Tensor> {
    let mut it = parts.iter();
    let first = it
        .next()
        .and_then(|t| t.clone())
        .ok_or_else(|| Error::Distributed("all-reduce without rank 0's tensor".into()))?;
    let mut acc = first;
    for t in it {
        let t = t
            .as_ref()
            .ok_or_else(|| Error::Distributed("all-reduce with a missing tensor".into()))?;
        acc = (acc + t)?;
    }
    Ok(acc)
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Self::sum_in_rank_order(&self.exchange(Some(t))?)
    }

    fn reduce_sum(&self, t: &Tensor, root: usize) -> Result<Option<Tensor>> {
        let parts = self.exchange(Some(t))?;
        if self.rank == root {
            Ok(Some(Self::sum_in_rank_order(&parts)?))
        } else {
            Ok(None)
        }
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mine = (self.rank == root).then_some(t);
        let parts = self.exchange(mine)?;
        parts
            .get(root)
            .cloned()
            .flatten()
            .ok_or_else(|| Error::Distributed(format!("broadcast: rank {root} sent nothing")))
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        self.exchange(Some(t))?
            .into_iter()
            .enumerate()
            .map(|(r, x)| {
                x.ok_or_else(|| Error::Distributed(format!("all-gather: rank {r} sent nothing")))
            })
            .collect()
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(None).map(|_| ())
    }

    fn abort(&self, reason: &str) {
        if let Ok(mut st) = self.shared.state.lock() {
            if st.failed.is_none() {
                st.failed = Some((self.rank, reason.to_string()));
            }
            self.shared.cond.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One rank's (sums, broadcast, gathered, reduce landed where it should).
    type RankResults = (Vec<f32>, Vec<f32>, Vec<f32>, bool);

    #[test]
    fn sums_gathers_and_broadcasts_in_rank_order() {
        let group = ThreadGroup::new(3, Duration::from_secs(10));
        let handles: Vec<_> = group
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || -> Result<RankResults> {
                    let t = Tensor::new(&[g.rank() as f32 + 1.0, 10.0], &Device::Cpu)?;
                    let mut sums = Vec::new();
                    for _ in 0..5 {
                        sums = g.all_reduce_sum(&t)?.to_vec1::<f32>()?;
                    }
                    let b = g.broadcast(&t, 2)?.to_vec1::<f32>()?;
                    let all = g.all_gather(&t)?;
                    let gathered: Vec<f32> = all
                        .iter()
                        .map(|x| x.to_vec1::<f32>().map(|v| v[0]))
                        .collect::<candle_core::Result<_>>()?;
                    let reduced = g.reduce_sum(&t, 1)?;
                    g.barrier()?;
                    Ok((sums, b, gathered, reduced.is_some() == (g.rank() == 1)))
                })
            })
            .collect();
        for h in handles {
            let (sums, b, gathered, reduce_ok) = h.join().expect("thread").expect("collectives");
            assert_eq!(sums, [6.0, 30.0]);
            assert_eq!(b, [3.0, 10.0]);
            assert_eq!(gathered, [1.0, 2.0, 3.0]);
            assert!(reduce_ok);
        }
    }

    #[test]
    fn a_failed_rank_is_named_and_a_missing_one_times_out() {
        let mut group = ThreadGroup::new(2, Duration::from_millis(300));
        let g1 = group.pop().expect("rank 1");
        let g0 = group.pop().expect("rank 0");
        let t = Tensor::new(&[1f32], &Device::Cpu).expect("t");
        // Rank 1 never calls: rank 0 times out naming it.
        let err = g0.all_reduce_sum(&t).expect_err("timeout").to_string();
        assert!(err.contains("[1]"), "{err}");
        // Rank 1 fails: rank 0's next call says so at once.
        g1.abort("out of memory");
        let err = g0.barrier().expect_err("failed").to_string();
        assert!(err.contains("rank 1 failed: out of memory"), "{err}");
    }
}
