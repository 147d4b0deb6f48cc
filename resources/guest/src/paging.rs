//! Runtime additions to the boot identity map (ring 0, reached from ring 3
//! through `SYS_MAP`): MMIO windows above 4 GiB (the 64-bit BAR window,
//! RAM at the top of a large guest) and uncached attributes for device
//! memory below 3 GiB (the boot map makes only the top GiB uncached).
//!
//! Mappings are 2 MiB pages, user-accessible, identity. A few ring-0
//! instructions per 2 MiB page, so callers map only what they touch.

use core::arch::asm;

use crate::Global;

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PWT: u64 = 8;
const PCD: u64 = 0x10;
const PS: u64 = 0x80;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const TWO_MIB: u64 = 2 << 20;
/// Largest single request (keeps the ring-0 loop short).
const MAX_LEN: u64 = 64 << 20;
/// 4-level paging: 48-bit virtual addresses (identity, so physical too).
const VA_LIMIT: u64 = 1 << 47;
const POOL_PAGES: usize = 8;

#[repr(C, align(4096))]
struct Table([u64; 512]);

struct Pool {
    tables: [Table; POOL_PAGES],
    used: usize,
}

static POOL: Global<Pool> = Global::new(Pool {
    tables: [const { Table([0; 512]) }; POOL_PAGES],
    used: 0,
});

/// The table an entry points to, allocating (zeroed) if not present.
/// None if the pool is exhausted or the entry is a large page.
fn next_level(table: *mut u64, index: u64) -> Option<*mut u64> {
    unsafe {
        let e = table.add(index as usize);
        let v = e.read_volatile();
        if v & P != 0 {
            if v & PS != 0 {
                return None;
            }
            return Some((v & ADDR_MASK) as *mut u64);
        }
        let pool = POOL.get();
        if pool.used >= POOL_PAGES {
            return None;
        }
        let t = pool.tables[pool.used].0.as_mut_ptr();
        pool.used += 1;
        e.write_volatile(t as u64 | P | RW | US);
        Some(t)
    }
}

/// Identity-map `[addr, addr+len)` for ring 3; `uncached` sets PCD|PWT
/// (also on existing mappings). Returns false if something could not be
/// mapped (too large, beyond 47 bits, page-table pool exhausted, or a
/// 1 GiB page in the way of an attribute change).
pub fn map(addr: u64, len: u64, uncached: bool) -> bool {
    let end = match addr.checked_add(len) {
        Some(e) if len > 0 && len <= MAX_LEN && e <= VA_LIMIT => e,
        _ => return false,
    };
    let cr3: u64;
    unsafe { asm!("mov {0}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    let pml4 = (cr3 & ADDR_MASK) as *mut u64;
    let attr = if uncached { PWT | PCD } else { 0 };
    let mut ok = true;
    let mut va = addr & !(TWO_MIB - 1);
    while va < end {
        let pd =
            next_level(pml4, (va >> 39) & 511).and_then(|pdpt| next_level(pdpt, (va >> 30) & 511));
        match pd {
            Some(pd) => unsafe {
                let e = pd.add(((va >> 21) & 511) as usize);
                let v = e.read_volatile();
                if v & P == 0 {
                    e.write_volatile(va | P | RW | US | PS | attr);
                } else if v & PS != 0 {
                    e.write_volatile(v | US | attr);
                } else {
                    ok = false;
                }
            },
            None => ok = false,
        }
        va += TWO_MIB;
    }
    // Flush the TLB (no global pages are used).
    unsafe { asm!("mov cr3, {0}", in(reg) cr3, options(nostack, preserves_flags)) };
    ok
}
