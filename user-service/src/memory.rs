//! How user-service's memory goes back to the system after a burst.

/// argon2 takes each hash's memory (19 MiB by default) as one block. glibc
/// serves a block that large with mmap, but after the first one is freed it
/// raises its threshold to that size and serves the next ones from
/// per-thread arenas, which keep the memory after it is freed: a burst of
/// logins spread over the blocking pool's threads would leave one block
/// resident per thread long after the burst. A fixed threshold keeps every
/// large block on mmap, handed back to the system as soon as it is freed.
/// The binary calls this first thing; tests that measure memory call it too.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn return_large_blocks_to_the_system() {
    // SAFETY: mallopt only tunes the allocator (glibc serialises it with
    // allocations), and 1 MiB is a valid threshold.
    let done = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    if done == 0 {
        eprintln!("user-service: could not set the mmap threshold; freed password-hash memory may stay resident");
    }
}

/// Other allocators return large blocks by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn return_large_blocks_to_the_system() {}
