//! `SuiteCipher::seal` and `open` allocate nothing on the heap (they run once per 4 KiB
//! block on every I/O path). A counting global allocator watches them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use qvol_core::suite::CipherSuite;

struct Counting;

thread_local! {
    /// Allocations made by this thread (tests run on parallel threads).
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

fn count() {
    // A const-initialised Cell needs no allocation; during thread teardown it may be gone.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout` (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn the_counter_sees_allocations() {
    let before = allocations();
    let v = std::hint::black_box(vec![1u8; 100]);
    assert!(allocations() > before);
    drop(v);
}

#[test]
fn seal_and_open_do_not_allocate() {
    let mut buf = vec![0x5au8; 65536];
    let nonce = [9u8; 32];
    for suite in CipherSuite::ALL {
        let n = &nonce[..suite.nonce_len()];
        for cipher in [suite.cipher(&[1; 32]), suite.reference_cipher(&[1; 32])] {
            // The first call may initialise CPU feature detection; count the later ones.
            let tag = cipher.seal(n, b"ad", &mut buf);
            cipher
                .open(n, b"ad", &mut buf, &tag)
                .expect("genuine block");
            let before = allocations();
            for len in [0usize, 1, 4096, 65536] {
                let tag = cipher.seal(n, b"ad", &mut buf[..len]);
                cipher
                    .open(n, b"ad", &mut buf[..len], &tag)
                    .expect("genuine block");
            }
            let after = allocations();
            assert_eq!(
                after, before,
                "{suite} ({cipher:?}) allocated during seal/open"
            );
        }
    }
}
