//! Real Linux guests: Debian's cloud kernel with a busybox initramfs, booted
//! by `abide` as a bzImage and as a PVH vmlinux.
//!
//! Where this host's CPU has vmx/svm the guests run directly; otherwise (PVM,
//! as on the project's machines) they run inside the nested test host:
//! QEMU TCG with emulated AMD-V, where KVM is real. One nested-host boot runs
//! every scenario, to pay its start-up once.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use abide_tests::{abide_bin, repo_root, run_command, Outcome};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn guest_file(name: &str) -> PathBuf {
    let p = repo_root().join(".cache/linux/guest").join(name);
    assert!(
        p.exists(),
        "{} is missing: run resources/linux/fetch-kernels.sh and \
         resources/linux/build-guest-initramfs.sh (./test.sh does both)",
        p.display()
    );
    p
}

/// One `abide run` inside the shared session, delimited in the output.
struct Scenario {
    name: &'static str,
    kernel: &'static str,
    cmdline: &'static str,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "bzimage",
        kernel: "vmlinuz",
        cmdline: "console=ttyS0 quiet abide.test=basic",
    },
    Scenario {
        name: "pvh",
        kernel: "vmlinux",
        cmdline: "console=ttyS0 quiet abide.test=basic",
    },
];

fn session() -> (Outcome, i64, i64) {
    let abide = abide_bin();
    let initrd = guest_file("initramfs.cpio.gz");
    let mut script = String::new();
    for s in SCENARIOS {
        let kernel = guest_file(s.kernel);
        script.push_str(&format!(
            "echo '@@@ begin {name}'; '{abide}' run --kernel '{kernel}' --initrd '{initrd}' \
             --cmdline '{cmdline}' --cpus 2 --memory 512M --serial stdio </dev/null; \
             echo \"@@@ end {name} rc=$?\"\n",
            name = s.name,
            abide = abide.display(),
            kernel = kernel.display(),
            initrd = initrd.display(),
            cmdline = s.cmdline,
        ));
    }
    let start = now();
    let out = run_command(
        Command::new(repo_root().join("resources/linux/run-direct-or-nested.sh"))
            .args(["--timeout", "600", "--", "sh", "-c", &script])
            .current_dir(repo_root()),
        None,
        Duration::from_secs(660),
    );
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
