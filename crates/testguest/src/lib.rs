//! Ferry's test guest and the host side of its contract.
//!
//! The guest itself (`guest/` at the workspace root, a `no_std` program)
//! is built by this crate's build script; [`GUEST_ELF`] is the result and
//! [`guest_elf_path`] where it lies. `guest/README.md` is the contract: boot
//! ABI, command line, ports, workload and console lines. This crate holds
//! the only host-side code that knows that contract:
//!
//! * [`workload`]: the workload syntax (`idle`, `dirty:WS_MB:RATE[:FILL_MB]`),
//! * [`net`]: the network service (`net=IP/PREFIX:PORT`) and the
//!   `+`-joined workload form (`dirty:256:100+net:10.77.0.2/24:7000`),
//! * [`console`]: the parser of the guest's console lines,
//! * [`guest_cmdline`] and [`guest_cmdline_with_net`]: the command line a
//!   VMM passes to the guest,
//! * [`guest_ws_base`] and [`guest_mem_needed`]: how much RAM a workload
//!   needs, to refuse one before booting.

pub mod console;
pub mod disk;
pub mod net;
pub mod workload;

use std::path::Path;

use workload::Workload;

/// The test guest ELF: PVH note for QEMU, `e_entry` for Ferry (see
/// `guest/README.md`).
pub const GUEST_ELF: &[u8] = include_bytes!(env!("FERRY_GUEST_ELF"));

/// Where the build put [`GUEST_ELF`], for programs that want a file (QEMU's
/// `-kernel`).
pub fn guest_elf_path() -> &'static Path {
    Path::new(env!("FERRY_GUEST_ELF"))
}

/// Most vCPUs the guest runs on (`cpus=` above this is refused).
pub const MAX_VCPUS: u32 = 64;
/// COM1, the guest's console (ports `COM1_BASE ..= COM1_BASE + 7`).
pub const COM1_BASE: u16 = 0x3f8;
/// The guest writes its exit code here before it stops.
pub const EXIT_PORT: u16 = 0x501;

/// The guest command line for `workload` on `cpus` vCPUs; with `tsc_khz`
/// the guest skips its PIT calibration (a VMM without a PIT must pass it).
pub fn guest_cmdline(workload: &Workload, cpus: u32, tsc_khz: Option<u32>) -> String {
    let mut line = format!("workload={workload} cpus={cpus}");
    if let Some(khz) = tsc_khz {
        line.push_str(&format!(" tsc_khz={khz}"));
    }
    line
}

/// [`guest_cmdline`] for a workload with its optional network service and
/// disk workload (`dirty:256:100+net:10.77.0.2/24:7000+disk:16:200`):
/// `net=` and `disk=` follow the other keys.
pub fn guest_cmdline_with_net(
    workload: &net::GuestWorkload,
    cpus: u32,
    tsc_khz: Option<u32>,
) -> String {
    let mut line = guest_cmdline(&workload.workload, cpus, tsc_khz);
    if let Some(net) = workload.net {
        line.push_str(&format!(" net={net}"));
    }
    if let Some(disk) = workload.disk {
        line.push_str(&format!(" disk={disk}"));
    }
    line
}

/// Guest-physical address where the guest's working set starts: the first
/// 2 MiB boundary after the image (it is also in the READY line).
pub fn guest_ws_base() -> u64 {
    elf_load_end(GUEST_ELF)
        .expect("the built guest is a valid ELF64")
        .next_multiple_of(2 << 20)
}

/// Bytes of guest RAM, counted from address 0, that `workload` needs to
/// run: everything up to the end of its fill region. The guest refuses to
/// run (EXIT) when its memory map does not cover that.
pub fn guest_mem_needed(workload: &Workload) -> u64 {
    guest_ws_base().saturating_add(workload.bytes_needed())
}

/// End (physical) of the highest PT_LOAD segment of an ELF64 image.
fn elf_load_end(elf: &[u8]) -> Option<u64> {
    let u16_at = |off: usize| Some(u16::from_le_bytes(elf.get(off..off + 2)?.try_into().ok()?));
    let u32_at = |off: usize| Some(u32::from_le_bytes(elf.get(off..off + 4)?.try_into().ok()?));
    let u64_at = |off: usize| Some(u64::from_le_bytes(elf.get(off..off + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut end = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        const PT_LOAD: u32 = 1;
        if u32_at(ph)? == PT_LOAD {
            let seg_end = u64_at(ph + 0x18)?.checked_add(u64_at(ph + 0x28)?)?;
            end = end.max(Some(seg_end));
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_elf_has_the_pvh_note_and_entry() {
        assert_eq!(&GUEST_ELF[..4], b"\x7fELF");
        assert_eq!(
            GUEST_ELF,
            std::fs::read(guest_elf_path()).unwrap().as_slice()
        );
        // e_entry (ferry_entry64) lies in the image, above 1 MiB.
        let entry = u64::from_le_bytes(GUEST_ELF[0x18..0x20].try_into().unwrap());
        assert!(
            entry >= 0x10_0000 && entry < guest_ws_base(),
            "e_entry {entry:#x}"
        );
        // The PVH note: namesz 4, descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0".
        let note = [
            4u32.to_le_bytes(),
            4u32.to_le_bytes(),
            18u32.to_le_bytes(),
            *b"Xen\0",
        ]
        .concat();
        assert!(
            GUEST_ELF.windows(note.len()).any(|w| w == note.as_slice()),
            "no PVH note"
        );
    }

    #[test]
    fn ws_base_is_2mib_aligned_after_the_image() {
        let base = guest_ws_base();
        assert_eq!(base % (2 << 20), 0);
        assert!(base > 0x10_0000);
        let dirty: Workload = "dirty:64:100:32".parse().unwrap();
        assert_eq!(guest_mem_needed(&dirty), base + (96 << 20));
        assert_eq!(guest_mem_needed(&Workload::Idle), base);
    }

    #[test]
    fn cmdline() {
        let w: Workload = "dirty:256:max:64".parse().unwrap();
        assert_eq!(
            guest_cmdline(&w, 2, Some(2_596_000)),
            "workload=dirty:256:max:64 cpus=2 tsc_khz=2596000"
        );
        assert_eq!(
            guest_cmdline(&Workload::Idle, 1, None),
            "workload=idle cpus=1"
        );
        let w: net::GuestWorkload = "dirty:64:100+net:10.77.0.2/24:7000".parse().unwrap();
        assert_eq!(
            guest_cmdline_with_net(&w, 2, Some(2_596_000)),
            "workload=dirty:64:100 cpus=2 tsc_khz=2596000 net=10.77.0.2/24:7000"
        );
        let w: net::GuestWorkload = "idle".parse().unwrap();
        assert_eq!(guest_cmdline_with_net(&w, 1, None), "workload=idle cpus=1");
    }
}
