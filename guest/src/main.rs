//! ferry-guest: the test guest every Ferry test and benchmark boots.
//!
//! A `no_std` program whose workload runs in ring 3 (ring 0 is emulated on
//! this nested-PVM host, thousands of times slower), takes no interrupts,
//! raises no exceptions (any would be a triple fault) and talks over COM1.
//! README.md is the contract: boot ABI, command line, ports, workload and
//! console lines. This file is the boot sequence; each module holds one
//! idea:
//!
//! * `entry`: the assembly entry points (QEMU's PVH stub, Ferry's ring-3 entry)
//! * `start_info`: reading the PVH `hvm_start_info`
//! * `cmdline`: parsing the command line
//! * `time`: the TSC, its calibration, the stall clock
//! * `layout`: where the working set and fill region go, and the shares
//! * `workload`: page contents, fill, verify-and-rewrite
//! * `throttle`: the per-vCPU token bucket
//! * `stats`: per-vCPU counters, READY, heartbeat and ERR lines
//! * `net`: the virtio-net card, the TCP/IP stack and the echo services
//! * `blk`: the virtio-blk disk and its generation-tagged workload
//! * `virtio`: finding virtio-mmio devices, DMA memory for their queues
//! * `console`: whole-line output on COM1, EXIT
//! * `sync`, `pio`, `mem`: spin lock and one-shot publication, port I/O,
//!   the C memory functions

#![no_std]
#![no_main]

mod blk;
mod cmdline;
mod console;
mod entry;
mod layout;
mod mem;
mod net;
mod pio;
mod start_info;
mod stats;
mod sync;
mod throttle;
mod time;
mod virtio;
mod workload;

use core::panic::PanicInfo;

use console::{code, Line};
use layout::{NoFit, Plan};
use stats::Heartbeat;
use sync::Published;
use time::{rdtsc, Tsc};

/// Most vCPUs the guest has stacks and counters for.
pub const MAX_CPUS: usize = 64;
/// Each vCPU's stack: 64 KiB.
pub const STACK_SHIFT: u32 = 16;
pub const STACK_SIZE: usize = 1 << STACK_SHIFT;
/// `version=` in the FERRY-GUEST line; bumped when a line format changes
/// incompatibly.
const VERSION: u64 = 1;

/// The boot plan: vCPU 0 publishes it, the others wait for it.
static PLAN: Published<Plan> = Published::new();

/// Rust entry of every vCPU, called by `ferry_entry64` on its own stack.
extern "C" fn ferry_main(cpu: u64, start_info: u64) -> ! {
    if cpu == 0 {
        boot_cpu(start_info)
    } else {
        // The index was checked against MAX_CPUS by ferry_entry64.
        secondary_cpu(cpu as u32)
    }
}

/// Called by `ferry_entry64` (on a spare stack) for a vCPU index the guest
/// has no stack for.
extern "C" fn ferry_too_many_cpus(cpu: u64) -> ! {
    console::exit(code::TOO_MANY_CPUS, |l| {
        l.text("vCPU index ")
            .dec(cpu)
            .text(" is beyond the 64 vCPUs this guest supports");
    })
}

/// vCPU 0: reads start_info and the command line, learns the TSC
/// frequency, announces itself, lays out the workload, releases the other
/// vCPUs and runs its own share while reporting.
fn boot_cpu(start_info: u64) -> ! {
    let boot_tsc = rdtsc();
    let info = match start_info::read(start_info) {
        Ok(info) => info,
        Err(why) => {
            announce(0, 0, b"");
            console::exit(code::BAD_START_INFO, |l| {
                l.text("bad start_info: ").text(why);
            })
        }
    };
    let cmdline = info.cmdline();
    let opts = match cmdline::parse(cmdline) {
        Ok(opts) => opts,
        Err(e) => {
            // cpus and tsc_khz are unknown: say 0.
            announce(0, 0, cmdline);
            console::exit(code::BAD_CMDLINE, |l| {
                l.text("bad command line: ")
                    .text(e.what)
                    .text(": ")
                    .printable(e.token);
            })
        }
    };
    let Some(khz) = opts.tsc_khz.or_else(time::calibrate) else {
        announce(opts.cpus, 0, cmdline);
        console::exit(code::NO_TSC_FREQ, |l| {
            l.text("cannot measure the TSC frequency against the PIT; pass tsc_khz=");
        })
    };
    announce(opts.cpus, khz, cmdline);

    let plan = match Plan::new(&opts, Tsc::new(khz), boot_tsc, info.ram()) {
        Ok(plan) => plan,
        Err(NoFit {
            start,
            end,
            ram_end,
        }) => console::exit(code::NO_FIT, |l| {
            l.text("workload does not fit in RAM: it needs ")
                .hex(start)
                .text("..")
                .hex(end)
                .text(" but RAM from ")
                .hex(start)
                .text(" ends at ")
                .hex(ram_end.max(start));
        }),
    };
    // Before the other vCPUs start: a VM without the card it was promised
    // stops here, with nothing written.
    let net = opts.net.map(|cfg| match net::Net::init(&cfg, plan.tsc) {
        Ok(net) => net,
        Err(e) => console::exit(code::NO_NET, |l| e.describe(l)),
    });
    let disk = opts
        .disk
        .map(|cfg| match blk::Disk::init(&cfg, plan.tsc, rdtsc()) {
            Ok(disk) => disk,
            Err(e) => console::exit(code::NO_DISK, |l| e.describe(l)),
        });
    let plan = PLAN.publish(plan);
    workload::run(0, plan, Some(Heartbeat::new(plan, rdtsc())), net, disk)
}

/// Every other vCPU: waits for vCPU 0's plan, then runs its share.
fn secondary_cpu(cpu: u32) -> ! {
    let plan = PLAN.wait();
    if cpu >= plan.cpus {
        console::exit(code::TOO_MANY_CPUS, |l| {
            l.text("vCPU index ")
                .dec(u64::from(cpu))
                .text(" started but cpus=")
                .dec(u64::from(plan.cpus));
        });
    }
    workload::run(cpu, plan, None, None, None)
}

/// The FERRY-GUEST line: first on the console, whatever happens next.
fn announce(cpus: u32, tsc_khz: u64, cmdline: &[u8]) {
    Line::new("FERRY-GUEST")
        .field("version", VERSION)
        .field("cpus", u64::from(cpus))
        .field("tsc_khz", tsc_khz)
        .text(" cmdline=")
        .printable(cmdline)
        .send();
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    console::exit_forced(code::PANIC, |l| {
        use core::fmt::Write;
        l.text("panic");
        if let Some(loc) = info.location() {
            let _ = write!(l, " at {}:{}:{}", loc.file(), loc.line(), loc.column());
        }
        let _ = write!(l, ": {}", info.message());
    })
}

/// The prebuilt `core` (compiled for unwinding) keeps a reference to the
/// unwinder's personality routine in its exception tables. With
/// `panic = "abort"` nothing ever unwinds, so it is never called; it only
/// has to exist for the link.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
