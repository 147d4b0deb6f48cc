//! Real Linux guests: Debian's cloud kernel with a busybox initramfs, booted
//! by `abide` as a bzImage and as a PVH vmlinux.
//!
//! Where this host's CPU has vmx/svm the guests run directly; otherwise (PVM,
//! as on the project's machines) they run inside the nested test host:
//! QEMU TCG with emulated AMD-V, where KVM is real. One nested-host boot runs
//! every scenario, to pay its start-up once.

use std::sync::OnceLock;

use abide_tests::session::run_where_linux_runs;
use abide_tests::{abide_bin, guest_file, now, Outcome};

/// One `abide run` inside the shared session, delimited in the output.
struct Scenario {
    name: &'static str,
    kernel: &'static str,
    cmdline: &'static str,
    /// Extra `abide run` arguments.
    args: &'static str,
    /// The CPU model the guest gets.
    cpu: fn() -> abide_machines::CpuModel,
}

const SCENARIOS: &[Scenario] = &[
    // The default machine type (pc-3.0) and its CPU model, abide-v2.
    Scenario {
        name: "bzimage",
        kernel: "vmlinuz",
        cmdline: "console=ttyS0 quiet abide.test=basic",
        args: "",
        cpu: abide_machines::abide_v2,
    },
    Scenario {
        name: "pvh",
        kernel: "vmlinux",
        cmdline: "console=ttyS0 quiet abide.test=basic",
        args: "",
        cpu: abide_machines::abide_v2,
    },
    Scenario {
        name: "cpu-v1",
        kernel: "vmlinuz",
        cmdline: "console=ttyS0 quiet abide.test=basic",
        args: "--machine pc-1.0",
        cpu: abide_machines::abide_v1,
    },
];

/// Option ROM given to the Linux guest's virtio-net on pc-1.0 (75,776 bytes).
const PXE_ROM: &str = "/usr/lib/ipxe/qemu/pxe-virtio.rom";
/// The combined EFI+PXE ROM (249,344 bytes): only pc-2.0's slot holds it.
const EFI_ROM: &str = "/usr/lib/ipxe/qemu/efi-virtio.rom";

/// The PCI scenario: two disks (one read-only), a tap-backed NIC with an
/// iPXE ROM, an rng. The tap and the host end of the link are created inside
/// the test host; afterwards the disk images are checked there.
fn pci_scenario(abide: &str, kernel: &str, initrd: &str) -> String {
    format!(
        r#"T=$(mktemp -d)
truncate -s 16M "$T/rw.img"; truncate -s 4M "$T/ro.img"
ip tuntap add dev abtap0 mode tap && ip addr add 192.168.213.1/24 dev abtap0 && ip link set abtap0 up
echo '@@@ begin pci'
'{abide}' run --kernel '{kernel}' --initrd '{initrd}' --cmdline 'console=ttyS0 quiet abide.test=pci' \
  --machine pc-1.0 --cpus 2 --memory 512M --disk "path=$T/rw.img" --disk "path=$T/ro.img,readonly=on" \
  --net tap=abtap0,mac=52:54:00:ab:cd:01,rom={PXE_ROM} --rng </dev/null
echo "@@@ end pci rc=$?"
echo "host-check ext2_magic=$(od -An -tx1 -j 1080 -N 2 "$T/rw.img" | tr -d ' ')"
echo "host-check pattern=$(dd if="$T/rw.img" bs=512 skip=20000 count=1 2>/dev/null | head -c 23)"
echo "host-check ro_nonzero=$(tr -d '\000' < "$T/ro.img" | wc -c)"
truncate -s 16M "$T/v2.img"
echo '@@@ begin pc2'
'{abide}' run --kernel '{kernel}' --initrd '{initrd}' --cmdline 'console=ttyS0 quiet abide.test=pci' \
  --machine pc-2.0 --cpus 4 --memory 512M --disk "path=$T/v2.img" \
  --net tap=abtap0,mac=52:54:00:ab:cd:02,rom={EFI_ROM} </dev/null
echo "@@@ end pc2 rc=$?"
truncate -s 16M "$T/intx.img"
echo '@@@ begin intx'
'{abide}' run --kernel '{kernel}' --initrd '{initrd}' \
  --cmdline 'console=ttyS0 quiet pci=nomsi abide.test=pci' \
  --cpus 2 --memory 512M --disk "path=$T/intx.img" --rng </dev/null
echo "@@@ end intx rc=$?"
echo "host-check intx_pattern=$(dd if="$T/intx.img" bs=512 skip=20000 count=1 2>/dev/null | head -c 23)"
"#
    )
}

fn session() -> &'static (Outcome, i64, i64) {
    static SESSION: OnceLock<(Outcome, i64, i64)> = OnceLock::new();
    SESSION.get_or_init(run_session)
}

fn run_session() -> (Outcome, i64, i64) {
    let abide = abide_bin();
    let initrd = guest_file("initramfs.cpio.gz");
    let mut script = String::new();
    for s in SCENARIOS {
        let kernel = guest_file(s.kernel);
        script.push_str(&format!(
            "echo '@@@ begin {name}'; '{abide}' run --kernel '{kernel}' --initrd '{initrd}' \
             --cmdline '{cmdline}' --cpus 2 --memory 512M --serial stdio {args} </dev/null; \
             echo \"@@@ end {name} rc=$?\"\n",
            name = s.name,
            args = s.args,
            abide = abide.display(),
            kernel = kernel.display(),
            initrd = initrd.display(),
            cmdline = s.cmdline,
        ));
    }
    script.push_str(&pci_scenario(
        &abide.display().to_string(),
        &guest_file("vmlinuz").display().to_string(),
        &initrd.display().to_string(),
    ));
    let start = now();
    let out = run_where_linux_runs(&["sh", "-c", &script], 600, "linux_guest");
    (out, start, now())
}

fn section<'a>(out: &'a str, name: &str) -> (&'a str, Option<i32>) {
    let begin = format!("@@@ begin {name}");
    let end = format!("@@@ end {name} rc=");
    let from = out
        .find(&begin)
        .unwrap_or_else(|| panic!("scenario {name} never started\n{out}"));
    let rest = &out[from..];
    match rest.find(&end) {
        Some(to) => {
            let rc = rest[to + end.len()..]
                .lines()
                .next()
                .and_then(|l| l.trim().parse().ok());
            (&rest[..to], rc)
        }
        None => (rest, None),
    }
}

fn field<'a>(text: &'a str, key: &str) -> &'a str {
    let prefix = format!("abide-linux: {key}=");
    text.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("guest did not report {key}\n{text}"))
}

#[test]
fn linux_boots_as_bzimage_and_pvh() {
    let (out, start, end) = session();
    let (start, end) = (*start, *end);
    eprintln!("{}", out.stderr.lines().next().unwrap_or(""));
    assert_eq!(out.code, Some(0), "test host session failed\n{out}");
    for s in SCENARIOS {
        let (text, rc) = section(&out.stdout, s.name);
        assert!(
            text.contains("abide-linux: userspace"),
            "{}: Linux did not reach userspace\n{text}",
            s.name
        );
        assert_eq!(
            field(text, "nproc"),
            "2",
            "{}: vCPUs online\n{text}",
            s.name
        );
        let epoch: i64 = field(text, "epoch").parse().expect("epoch is a number");
        assert!(
            epoch >= start - 5 && epoch <= end + 5,
            "{}: guest RTC time {epoch} outside the test's window {start}..{end}\n{text}",
            s.name
        );
        let date = field(text, "date");
        assert!(date.starts_with("20") && date.ends_with('Z'), "{date}");
        assert!(text.contains("abide-linux: poweroff"), "{}\n{text}", s.name);
        assert_eq!(
            rc,
            Some(0),
            "{}: `poweroff -f` should end abide with exit code 0\n{text}",
            s.name
        );
        assert!(
            !text.contains("abide: error"),
            "{}: abide reported an error\n{text}",
            s.name
        );
    }
}

#[test]
fn linux_sees_the_cpu_model() {
    let (out, _, _) = session();
    assert_eq!(out.code, Some(0), "test host session failed\n{out}");
    let nested = !out.stderr.contains("running directly");
    // XSAVE and what needs it. In the nested test host (QEMU TCG's emulated
    // AMD-V) CPUID.0xD.0 EBX stays at the legacy-area size after the guest
    // enables AVX in XCR0 (its KVM apparently never sees the XSETBV;
    // `--cpu host` shows the same), so Linux reports an XSAVE consistency
    // problem, falls back to FXSAVE and drops these flags. Only there, and
    // only with that report in the kernel log, are they not required;
    // wherever the model runs directly they are.
    let xsave_dependent = ["xsave", "avx", "avx2", "fma", "xsaveopt", "xgetbv1"];
    for s in SCENARIOS {
        let (text, _) = section(&out.stdout, s.name);
        let model = (s.cpu)();
        assert_eq!(field(text, "cpu_model"), model.brand, "{}\n{text}", s.name);
        let flags: Vec<&str> = field(text, "cpu_flags").split_whitespace().collect();
        let xsave_dropped = model.features.has("xsave") && !flags.contains(&"xsave");
        if xsave_dropped {
            let problems: u32 = field(text, "xsave_problems").parse().expect("a count");
            assert!(
                nested && problems > 0,
                "{}: Linux dropped XSAVE {} ({problems} XSAVE consistency reports in its log)\n{text}",
                s.name,
                if nested { "for an unknown reason" } else { "on a host that runs the model directly" },
            );
        }
        let mut not_checked = Vec::new();
        for f in model.features.names() {
            if xsave_dropped && xsave_dependent.contains(&f) {
                not_checked.push(f);
                continue;
            }
            assert!(flags.contains(&f), "{}: Linux lacks {f}: {flags:?}", s.name);
        }
        if not_checked.is_empty() {
            let xsave = if model.features.has("xsave") {
                ", XSAVE included"
            } else {
                ""
            };
            eprintln!("{}: every flag of {} checked{xsave}", s.name, model.name);
        } else {
            abide_tests::report(&format!(
                "NOT CHECKED ({}, {}): {} -- the nested test host's KVM drops XSAVE \
                 (Linux logged an XSAVE consistency problem); a host with vmx/svm runs \
                 the model directly and checks them",
                s.name,
                model.name,
                not_checked.join(" ")
            ));
        }
        // Nothing of the host's leaks: these are offered by the test host's
        // KVM (AMD) but in no named model.
        for f in [
            "svm",
            "sse4a",
            "mmxext",
            "cmp_legacy",
            "tsc_adjust",
            "npt",
            "virt_ssbd",
        ] {
            assert!(
                !flags.contains(&f),
                "{}: host's {f} leaked: {flags:?}",
                s.name
            );
        }
    }
}

fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
        .collect()
}

#[test]
fn linux_sees_pci_and_virtio() {
    let (out, _, _) = session();
    assert_eq!(out.code, Some(0), "test host session failed\n{out}");
    let (text, rc) = section(&out.stdout, "pci");
    eprintln!("--- what Linux saw ---");
    for l in lines(text, "abide-linux: ") {
        eprintln!("{l}");
    }
    assert_eq!(rc, Some(0), "abide should exit 0 after poweroff\n{text}");
    // This scenario runs pc-1.0: iPXE's pxe-virtio.rom in a 128 KiB slot.
    let m = abide_machines::pc_1_0();
    let pci = lines(text, "abide-linux: pci ");
    let find = |bdf: &str| {
        pci.iter()
            .find(|l| l.starts_with(&format!("bdf=0000:{bdf} ")))
            .unwrap_or_else(|| panic!("no {bdf} in sysfs\n{text}"))
            .to_string()
    };
    let hex = |v: u16| format!("0x{v:04x}");
    let expect = [
        ("00:00.0", m.pci.host_bridge, 0),
        ("00:01.0", m.virtio.blk.pci, 0),
        ("00:02.0", m.virtio.blk.pci, 0),
        (
            "00:03.0",
            m.virtio.net.pci,
            m.virtio.net.rom_slot.expect("slot"),
        ),
        ("00:04.0", m.virtio.rng.pci, 0),
    ];
    assert_eq!(pci.len(), expect.len(), "unexpected functions\n{text}");
    for (bdf, id, rom) in expect {
        let l = find(bdf);
        assert!(l.contains(&format!("vendor={}", hex(id.vendor))), "{l}");
        assert!(l.contains(&format!("device={}", hex(id.device))), "{l}");
        assert!(l.contains(&format!("class=0x{:06x}", id.class)), "{l}");
        assert!(l.contains(&format!("rom_size={rom} ")), "{l}");
        if bdf != "00:00.0" {
            assert!(l.ends_with("driver=virtio-pci"), "{l}");
        }
    }
    // virtio-blk: file system and raw data reached the host file.
    assert!(text.contains("abide-linux: vda mkfs=ok"), "{text}");
    assert!(text.contains("abide-linux: vda dd=ok"), "{text}");
    assert!(out.stdout.contains("host-check ext2_magic=53ef"), "{out}");
    assert!(
        out.stdout
            .contains("host-check pattern=abide-linux-blk-pattern"),
        "{out}"
    );
    // The read-only disk refused the write and stayed zero.
    assert!(text.contains("abide-linux: vdb ro=1"), "{text}");
    assert!(text.contains("abide-linux: vdb write=refused"), "{text}");
    assert!(out.stdout.contains("host-check ro_nonzero=0"), "{out}");
    // virtio-rng behind /dev/hwrng.
    let rng = lines(text, "abide-linux: hwrng ");
    assert_eq!(rng.len(), 1, "{text}");
    assert!(rng[0].contains("current=virtio_rng"), "{}", rng[0]);
    let bytes = rng[0].rsplit("bytes=").next().unwrap_or("");
    assert_eq!(bytes.len(), 64, "32 bytes in hex: {}", rng[0]);
    // virtio-net: the guest reaches the tap's host end.
    assert!(
        text.contains("abide-linux: net ping=ok mac=52:54:00:ab:cd:01"),
        "{text}"
    );
    // Every virtio interrupt is an MSI-X vector, and queues delivered some.
    let irqs = lines(text, "abide-linux: irq ");
    assert!(irqs.len() >= 5, "expected config+queue vectors\n{text}");
    let mut delivered = 0u64;
    for l in &irqs {
        assert!(l.contains("PCI-MSI"), "not MSI-X: {l}");
        let cpus: u64 = l
            .split_whitespace()
            .skip(1)
            .take(2)
            .filter_map(|c| c.parse::<u64>().ok())
            .sum();
        delivered += cpus;
    }
    assert!(delivered > 0, "no interrupts delivered\n{text}");
}

#[test]
fn linux_falls_back_to_intx() {
    let (out, _, _) = session();
    assert_eq!(out.code, Some(0), "test host session failed\n{out}");
    let (text, rc) = section(&out.stdout, "intx");
    assert_eq!(rc, Some(0), "{text}");
    let m = abide_machines::resolve("pc").expect("pc");
    // With MSI off, each virtio function uses INTA# on the IOAPIC, at the
    // GSI the machine's _PRT swizzle gives its slot.
    let irqs = lines(text, "abide-linux: irq ");
    assert_eq!(irqs.len(), 2, "one line per device\n{text}");
    for (slot, l) in [1usize, 2].iter().zip(&irqs) {
        let gsi = m.pci.intx_gsis[slot % 4];
        assert!(l.contains("IO-APIC"), "{l}");
        assert!(
            l.starts_with(&format!("{gsi}:")),
            "slot {slot} on GSI {gsi}: {l}"
        );
        assert!(l.contains("fasteoi"), "level-triggered: {l}");
    }
    assert!(text.contains("abide-linux: vda dd=ok"), "{text}");
    assert!(
        text.contains("abide-linux: hwrng current=virtio_rng"),
        "{text}"
    );
    assert!(
        out.stdout
            .contains("host-check intx_pattern=abide-linux-blk-pattern"),
        "{out}"
    );
}

/// What differs between pc-1.0 and pc-2.0, as a Linux guest sees it.
#[test]
fn linux_sees_machine_type_differences() {
    let (out, _, _) = session();
    assert_eq!(out.code, Some(0), "test host session failed\n{out}");
    let (v1, rc1) = section(&out.stdout, "pci");
    let (v2, rc2) = section(&out.stdout, "pc2");
    assert_eq!((rc1, rc2), (Some(0), Some(0)), "{v2}");
    let (m1, m2) = (abide_machines::pc_1_0(), abide_machines::pc_2_0());
    let field = |text: &str, prefix: &str, key: &str| -> String {
        lines(text, prefix)
            .first()
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key)))
            .unwrap_or_else(|| panic!("no {prefix}{key} in\n{text}"))
            .to_string()
    };
    // virtio-net ROM BAR: 128 KiB on pc-1.0 (pxe ROM), 256 KiB on pc-2.0 (EFI+PXE ROM).
    let nic = |text: &str| {
        lines(text, "abide-linux: pci ")
            .into_iter()
            .find(|l| l.contains("device=0x1041"))
            .unwrap_or_else(|| panic!("no virtio-net\n{text}"))
            .to_string()
    };
    let rom = |m: &abide_machines::MachineDescription| m.virtio.net.rom_slot.expect("slot");
    assert!(
        nic(v1).contains(&format!("rom_size={} ", rom(&m1))),
        "{}",
        nic(v1)
    );
    assert!(
        nic(v2).contains(&format!("rom_size={} ", rom(&m2))),
        "{}",
        nic(v2)
    );
    // virtio-blk queues: 1 on pc-1.0, 4 on pc-2.0 (Linux uses at most one
    // per vCPU, so that scenario has 4 vCPUs).
    assert_eq!(
        field(v1, "abide-linux: blk dev=vda ", "queues="),
        m1.virtio.blk.num_queues.to_string()
    );
    assert_eq!(
        field(v2, "abide-linux: blk dev=vda ", "queues="),
        m2.virtio.blk.num_queues.to_string()
    );
    // pc-2.0 has a virtio-rng without being asked; Linux binds it.
    assert!(
        lines(v2, "abide-linux: pci ")
            .iter()
            .any(|l| l.contains("device=0x1044") && l.ends_with("driver=virtio-pci")),
        "{v2}"
    );
    assert!(v2.contains("abide-linux: hwrng current=virtio_rng"), "{v2}");
}
