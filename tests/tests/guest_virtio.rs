//! The test guest drives Abide's PCI bus and virtio devices on /dev/kvm:
//! enumeration, virtio-blk I/O checked on the host, read-only disks,
//! virtio-rng, option ROM slots, and a hostile guest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use abide_tests::{run_abide, temp_dir, Outcome};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The default machine type's CPU model (abide-v2) needs hardware-assisted
/// KVM; these tests pin the baseline model so they also run under PVM.
const CPU: [&str; 2] = ["--cpu", "abide-v1"];
const SECTOR: u64 = 512;

fn disk(dir: &Path, mib: u64) -> PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).expect("create image");
    f.set_len(mib << 20).expect("size image");
    p
}

fn boot(args: &[&str]) -> Outcome {
    let mut all = vec!["run"];
    all.extend_from_slice(&CPU);
    all.extend_from_slice(args);
    let out = run_abide(&all, None, TIMEOUT);
    assert_eq!(out.code, Some(0), "guest should power off cleanly\n{out}");
    assert!(out.topic("panic").is_empty(), "guest panicked\n{out}");
    assert!(
        out.topic("error").is_empty(),
        "guest reported errors\n{out}"
    );
    out
}

/// The pattern the guest writes: byte i of sector s.
fn pattern(sector: u64, i: u64) -> u8 {
    ((sector * 131 + i * 7 + 0x5a) & 0xff) as u8
}

#[test]
fn pci_functions_match_the_machine() {
    let dir = temp_dir("pci");
    let img = disk(&dir, 16);
    let d = format!("path={}", img.display());
    let out = boot(&[
        "--machine",
        "pc-1.0",
        "--disk",
        &d,
        "--rng",
        "--cmdline",
        "pci quiet",
    ]);
    let fns = out.topic("pci");
    let bdfs: Vec<&str> = fns.iter().map(|l| l.get("bdf")).collect();
    assert_eq!(bdfs, ["00:00.0", "00:01.0", "00:02.0"], "{out}");
    let m = abide_machines::pc_1_0();
    let expect = [
        (&fns[0], m.pci.host_bridge),
        (&fns[1], m.virtio.blk.pci),
        (&fns[2], m.virtio.rng.pci),
    ];
    for (line, id) in expect {
        assert_eq!(line.num("vendor"), u64::from(id.vendor), "{out}");
        assert_eq!(line.num("device"), u64::from(id.device), "{out}");
        assert_eq!(line.num("class"), u64::from(id.class), "{out}");
        assert_eq!(line.num("rev"), u64::from(id.revision), "{out}");
        assert_eq!(line.num("subsys"), u64::from(id.subsystem), "{out}");
        assert_eq!(line.get("ecam"), "match", "{out}");
    }
    // Virtio functions: common, notify, ISR and (where the device has a
    // configuration space) device capabilities, then MSI-X; one 64-bit BAR.
    assert_eq!(fns[1].get("caps"), "0x09,0x09,0x09,0x09,0x11", "{out}");
    assert_eq!(
        fns[2].get("caps"),
        "0x09,0x09,0x09,0x11",
        "rng: no config\n{out}"
    );
    for f in &fns[1..] {
        assert_eq!(f.num("irq_pin"), 1);
    }
    let bars = out.topic("pci-bar");
    assert_eq!(bars.len(), 2, "{out}");
    for b in &bars {
        assert_eq!(b.num("index"), 0);
        assert_eq!(b.get("kind"), "mem64");
        assert_eq!(b.num("size"), m.virtio.layout.bar_size, "{out}");
        let a = b.num("addr");
        assert!(
            a >= m.pci.mmio64_base && a < m.pci.mmio64_base + m.pci.mmio64_size,
            "BAR in the 64-bit window\n{out}"
        );
    }
    assert_eq!(out.one("pci-done").num("functions"), 3);
}

#[test]
fn explicit_slot_addresses() {
    let dir = temp_dir("slots");
    let img = disk(&dir, 1);
    let d = format!("path={},addr=7", img.display());
    let out = boot(&["--disk", &d, "--rng", "addr=0x1f", "--cmdline", "pci quiet"]);
    let bdfs: Vec<String> = out
        .topic("pci")
        .iter()
        .map(|l| l.get("bdf").to_string())
        .collect();
    assert_eq!(bdfs, ["00:00.0", "00:07.0", "00:1f.0"], "{out}");
}

#[test]
fn blk_write_read_flush_reaches_the_file() {
    let dir = temp_dir("blk");
    let img = disk(&dir, 16);
    let d = format!("path={},serial=abide-test-disk", img.display());
    let out = boot(&[
        "--disk",
        &d,
        "--cmdline",
        "virtio-blk blk-write=100 blk-id quiet",
    ]);
    let blk = out.one("blk");
    assert_eq!(blk.num("capacity_sectors"), 16 << 11, "{out}");
    assert_eq!(blk.get("ro"), "0");
    let io = out.one("blk-io");
    assert_eq!(io.get("verify"), "ok", "{out}");
    assert_eq!(io.num("status"), 0);
    assert_eq!(io.num("flush_status"), 0, "{out}");
    assert_eq!(out.one("blk-id").get("id"), "abide-test-disk");
    // The host sees exactly the guest's bytes, and nothing around them.
    let bytes = std::fs::read(&img).expect("read image");
    for s in 100..108u64 {
        for i in 0..SECTOR {
            let got = bytes[(s * SECTOR + i) as usize];
            assert_eq!(got, pattern(s, i), "sector {s} byte {i}");
        }
    }
    assert!(bytes[(99 * SECTOR) as usize..(100 * SECTOR) as usize]
        .iter()
        .all(|b| *b == 0));
    assert!(bytes[(108 * SECTOR) as usize..(109 * SECTOR) as usize]
        .iter()
        .all(|b| *b == 0));
}

#[test]
fn readonly_disk_refuses_writes() {
    let dir = temp_dir("ro");
    let img = disk(&dir, 4);
    let d = format!("path={},readonly=on", img.display());
    let out = boot(&["--disk", &d, "--cmdline", "virtio-blk blk-write=8 quiet"]);
    assert_eq!(out.one("blk").get("ro"), "1", "{out}");
    let io = out.one("blk-io");
    assert_ne!(io.num("status"), 0, "write must fail\n{out}");
    let bytes = std::fs::read(&img).expect("read image");
    assert!(bytes.iter().all(|b| *b == 0), "image unchanged");
}

#[test]
fn rng_gives_bytes() {
    let out = boot(&["--rng", "--cmdline", "rng quiet"]);
    let r = out.one("rng");
    assert_eq!(r.num("bytes"), 64, "{out}");
    assert_eq!(r.get("distinct"), "1", "{out}");
}

/// The hostile guest's attacks on virtio-blk's queue, then on BAR
/// placement.
const HOSTILE_CASES: [&str; 9] = [
    "desc-oob",
    "desc-loop",
    "chain-too-long",
    "zero-len",
    "wrong-direction",
    "queue-across-end",
    "bad-head",
    "bar-over-ram",
    "bar-overlap",
];

/// What a device may answer to the guest's setup of an attack: it refused
/// the queue or DRIVER_OK (NEEDS_RESET). Anything else in `setup` is the
/// guest failing to mount the attack, which proves nothing.
const DEVICE_REFUSALS: [&str; 2] = ["virtio-queue-refused", "virtio-driver-ok-refused"];

#[test]
fn hostile_guest_breaks_nothing() {
    let dir = temp_dir("hostile");
    let img = disk(&dir, 16);
    // A pattern in every byte: the attacks only read, so none may change.
    let before: Vec<u8> = (0..16u64 << 20)
        .map(|i| (i * 13 + i / 4093) as u8)
        .collect();
    std::fs::write(&img, &before).expect("fill image");
    let d = format!("path={}", img.display());
    // A second device must keep working throughout.
    let out = boot(&["--disk", &d, "--rng", "--cmdline", "hostile rng quiet"]);
    let cases = out.topic("hostile");
    let names: Vec<&str> = cases.iter().map(|c| c.get("case")).collect();
    assert_eq!(
        names, HOSTILE_CASES,
        "every case runs once, in order\n{out}"
    );
    assert_eq!(
        out.one("hostile-done").num("cases"),
        HOSTILE_CASES.len() as u64,
        "the guest counts every case it started\n{out}"
    );
    assert!(out.topic("warn").is_empty(), "a case was skipped\n{out}");
    for c in &cases {
        let name = c.get("case");
        assert_eq!(
            c.get("recovered"),
            "1",
            "{name}: device must recover\n{out}"
        );
        if name == "bar-overlap" {
            assert_eq!(c.get("recovered_first"), "1", "{out}");
            assert_eq!(c.get("recovered_second"), "1", "{out}");
        }
        if name.starts_with("bar-") {
            continue;
        }
        let status = c.num("status");
        let needs_reset = status & 0x40 != 0;
        let failed_request = matches!(c.get("req_status"), "1" | "2");
        match c.fields.get("setup") {
            Some(setup) => assert!(
                DEVICE_REFUSALS.contains(&setup.as_str()) && needs_reset,
                "{name}: the guest could not mount the attack ({setup}): nothing was tested\n{out}"
            ),
            None => assert!(
                needs_reset || failed_request,
                "{name}: expected NEEDS_RESET or an error status\n{out}"
            ),
        }
    }
    // The rng, untouched by the attacks, still works afterwards.
    assert_eq!(out.one("rng").get("distinct"), "1", "{out}");
    // No byte of the image changed: the attacks wrote nothing.
    let after = std::fs::read(&img).expect("read image");
    assert!(after == before, "the attacks changed the disk image");
}

const PXE_ROM: &str = "/usr/lib/ipxe/qemu/pxe-virtio.rom";
const EFI_ROM: &str = "/usr/lib/ipxe/qemu/efi-virtio.rom";

/// A tap name unique to this test process.
fn tap_name(tag: &str) -> String {
    format!("ab{}{}", tag, std::process::id() % 100_000)
}

/// Boots `machine` with a virtio-net carrying `rom` and checks the ROM BAR
/// the guest sees: the machine's slot size, with a valid image in it. Needs
/// root and /dev/net/tun (for the tap); without them it fails, saying so.
fn rom_bar(machine: &str, rom: &str, tag: &str) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root && Path::new("/dev/net/tun").exists(),
        "cannot run the ROM BAR check on {machine}: it needs root and /dev/net/tun \
         to open a tap (CI runs as root)"
    );
    assert!(
        Path::new(rom).exists(),
        "{rom} missing: resources/scripts/setup.sh installs ipxe-qemu"
    );
    let net = format!("tap={},rom={rom}", tap_name(tag));
    let out = boot(&[
        "--machine",
        machine,
        "--net",
        &net,
        "--cmdline",
        "pci quiet",
    ]);
    let m = abide_machines::resolve(machine).expect("machine");
    let nic = out
        .topic("pci")
        .into_iter()
        .find(|l| l.num("device") == u64::from(m.virtio.net.pci.device))
        .unwrap_or_else(|| panic!("no virtio-net function\n{out}"));
    assert_eq!(nic.get("bdf"), "00:01.0");
    let found = out.one("pci-rom");
    let slot = m.virtio.net.rom_slot.expect("virtio-net has a ROM slot");
    // The slot, never the file, sets the BAR size.
    assert_eq!(found.num("size"), slot, "{out}");
    assert_eq!(found.get("signature"), "0x55aa", "{out}");
}

#[test]
fn pc_1_0_pxe_rom_in_a_128k_slot() {
    // 75,776-byte file, 128 KiB BAR.
    assert_eq!(
        abide_machines::pc_1_0().virtio.net.rom_slot,
        Some(128 << 10)
    );
    rom_bar("pc-1.0", PXE_ROM, "p");
}

#[test]
fn pc_2_0_efi_rom_in_a_256k_slot() {
    // 249,344 bytes: too big for pc-1.0, fits pc-2.0's 256 KiB slot.
    assert_eq!(
        abide_machines::pc_2_0().virtio.net.rom_slot,
        Some(256 << 10)
    );
    rom_bar("pc-2.0", EFI_ROM, "e");
}

#[test]
fn oversized_rom_is_refused_before_start() {
    assert!(Path::new(EFI_ROM).exists(), "{EFI_ROM} missing");
    // The check runs before any tap is opened, so no privileges are needed.
    let net = format!("tap=unused0,rom={EFI_ROM}");
    let out = run_abide(
        &["run", "--machine", "pc-1.0", "--net", &net],
        None,
        TIMEOUT,
    );
    assert_eq!(out.code, Some(1), "{out}");
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{out}");
    for needle in [
        "virtio-net",
        "249344 bytes",
        "131072-byte ROM slot",
        "'pc-1.0'",
    ] {
        assert!(err.contains(needle), "error should mention {needle}\n{out}");
    }
    assert!(out.stdout.is_empty(), "no guest ran\n{out}");
}
