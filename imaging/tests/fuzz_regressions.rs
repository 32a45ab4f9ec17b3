//! Inputs the decoder fuzzer (`examples/fuzz_decoders.rs`) found, kept as regressions: each must
//! fail with an error, without a panic and without an allocation above the decode limit. Its own
//! test binary, so that the counting allocator sees only this test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use llava_imaging::{decode_rgb_with, probe_size_with, DecodeLimits};

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn fuzz_findings_fail_cleanly_within_the_allocation_limit() {
    // The fuzzer's limits.
    let limits = DecodeLimits {
        max_pixels: 4096 * 4096,
        max_file_bytes: 64 << 20,
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/data/fuzz") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        LARGEST.store(0, Ordering::Relaxed);
        let probed = probe_size_with(&bytes, &limits);
        let decoded = decode_rgb_with(&bytes, &limits);
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest as u64 <= limits.max_alloc_bytes(),
            "{}: allocated {largest} bytes at once",
            path.display()
        );
        assert!(decoded.is_err(), "{}", path.display());
        if let Err(e) = probed {
            assert!(!e.to_string().is_empty());
        }
        n += 1;
    }
    assert!(n >= 1);
}
