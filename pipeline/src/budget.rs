//! A process-wide budget of decoded pixels: with many threads and a mixture full of the largest
//! allowed images, every thread could otherwise hold one full-size decode at once (16 threads x
//! 179 Mpx x 3 bytes = 8.6 GB). A decode waits until its pixels fit in the budget.

use std::sync::{Condvar, Mutex};

/// Pixels that may be decoded at the same time across all threads.
#[derive(Debug)]
pub struct PixelBudget {
    capacity: u64,
    in_use: Mutex<u64>,
    freed: Condvar,
}

/// Pixels held until dropped.
pub struct PixelLease<'a> {
    budget: &'a PixelBudget,
    pixels: u64,
}

impl PixelBudget {
    pub fn new(capacity: u64) -> Self {
        PixelBudget {
            capacity: capacity.max(1),
            in_use: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Waits until `pixels` (at most the whole budget) are free and holds them.
    pub fn acquire(&self, pixels: u64) -> PixelLease<'_> {
        let pixels = pixels.min(self.capacity);
        // A poisoned lock only means another decode panicked; the count is still right.
        let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        while *in_use + pixels > self.capacity {
            in_use = self.freed.wait(in_use).unwrap_or_else(|e| e.into_inner());
        }
        *in_use += pixels;
        PixelLease {
            budget: self,
            pixels,
        }
    }
}

impl Drop for PixelLease<'_> {
    fn drop(&mut self) {
        let mut in_use = self.budget.in_use.lock().unwrap_or_else(|e| e.into_inner());
        *in_use -= self.pixels;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn never_more_than_the_capacity_in_use() {
        let budget = PixelBudget::new(100);
        let live = AtomicU64::new(0);
        let peak = AtomicU64::new(0);
        std::thread::scope(|s| {
            for i in 0..16u64 {
                let (budget, live, peak) = (&budget, &live, &peak);
                s.spawn(move || {
                    for _ in 0..20 {
                        let want = 30 + i * 5; // 30..105: the largest is clamped to 100
                        let _lease = budget.acquire(want);
                        let now = live.fetch_add(want.min(100), Ordering::SeqCst) + want.min(100);
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        live.fetch_sub(want.min(100), Ordering::SeqCst);
                    }
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 100);
        assert_eq!(*budget.in_use.lock().unwrap(), 0);
    }
}
