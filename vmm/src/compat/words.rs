//! Manifest differences in words: what the guest would see change, e.g.
//! `virtio-blk (00:01.0) capacity: 16384 -> 32768 sectors (8 MiB -> 16 MiB)`
//! instead of two hex strings of configuration space. The raw field path
//! and values stay next to the words ([`crate::manifest::Difference`]).

use serde_json::Value;

/// The value at a manifest `path` (`a.b[2].c[0][1].d`).
fn at<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let mut v = root;
    for part in path.split('.') {
        let (name, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            v = v.get(name)?;
        }
        for idx in indexes.split(']').filter(|s| !s.is_empty()) {
            v = v.get(idx.trim_start_matches('[').parse::<usize>().ok()?)?;
        }
    }
    Some(v)
}

fn size(bytes: u64) -> String {
    const KIB: u64 = 1024;
    match bytes {
        b if b >= KIB * KIB && b % (KIB * KIB) == 0 => format!("{} MiB", b / (KIB * KIB)),
        b if b >= KIB && b % KIB == 0 => format!("{} KiB", b / KIB),
        b => format!("{b} bytes"),
    }
}

fn hex_bytes(v: Option<&Value>) -> Option<Vec<u8>> {
    hex::decode(v?.as_str()?).ok()
}

fn le_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
}

fn mac(b: &[u8]) -> Option<String> {
    let m = b.get(..6)?;
    Some(
        m.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

fn both<T>(l: Option<T>, r: Option<T>, f: impl Fn(T, T) -> String) -> Option<String> {
    Some(f(l?, r?))
}

fn bits(mask: u64) -> String {
    let set: Vec<String> = (0..64)
        .filter(|b| mask & (1 << b) != 0)
        .map(|b| b.to_string())
        .collect();
    set.join(",")
}

/// A change of an integer register in bits set and cleared.
fn bit_change(l: u64, r: u64) -> String {
    let mut parts = Vec::new();
    if r & !l != 0 {
        parts.push(format!("bits {} set", bits(r & !l)));
    }
    if l & !r != 0 {
        parts.push(format!("bits {} cleared", bits(l & !r)));
    }
    parts.join(", ")
}

fn pci_function(
    path: &str,
    a: &Value,
    b: &Value,
    l: Option<&Value>,
    r: Option<&Value>,
) -> Option<String> {
    let rest = path.strip_prefix("pci.functions[")?;
    let (index, rest) = rest.split_once(']')?;
    let rest = rest.strip_prefix('.').unwrap_or(rest);
    let fpath = format!("pci.functions[{index}]");
    let f = at(a, &fpath).or_else(|| at(b, &fpath))?;
    let model = f["model"].as_str().unwrap_or("PCI function");
    let bdf = f["bdf"].as_str().unwrap_or("?");
    let who = format!("{model} ({bdf})");
    let num = |v: Option<&Value>| v.and_then(Value::as_u64);
    Some(match rest {
        "" => format!(
            "PCI function {bdf} ({model}): {} -> {}",
            if l.is_some() { "present" } else { "absent" },
            if r.is_some() { "present" } else { "absent" }
        ),
        "virtio.config" if model == "virtio-blk" => {
            let (x, y) = (hex_bytes(l)?, hex_bytes(r)?);
            let (x, y) = (le_u64(&x)?, le_u64(&y)?);
            if x == y {
                format!("{who} device configuration (capacity unchanged, {x} sectors)")
            } else {
                format!(
                    "{who} capacity: {x} -> {y} sectors ({} -> {})",
                    size(x * 512),
                    size(y * 512)
                )
            }
        }
        "virtio.config" if model == "virtio-net" => {
            let (x, y) = (mac(&hex_bytes(l)?)?, mac(&hex_bytes(r)?)?);
            if x == y {
                format!("{who} device configuration (MAC unchanged)")
            } else {
                format!("{who} MAC address: {x} -> {y}")
            }
        }
        "virtio.features" => both(num(l), num(r), |x, y| {
            format!("{who} virtio features offered: {}", bit_change(x, y))
        })?,
        "virtio.queue_sizes" => format!("{who} queue sizes"),
        "virtio.msix_vectors" => both(num(l), num(r), |x, y| {
            format!("{who} MSI-X vectors: {x} -> {y}")
        })?,
        "rom" => format!(
            "{who} option ROM: {} -> {}",
            if l.is_some_and(|v| !v.is_null()) {
                "present"
            } else {
                "none"
            },
            if r.is_some_and(|v| !v.is_null()) {
                "present"
            } else {
                "none"
            }
        ),
        "rom.slot_size" => both(num(l), num(r), |x, y| {
            format!("{who} option ROM slot: {} -> {}", size(x), size(y))
        })?,
        "rom.image_size" => both(num(l), num(r), |x, y| {
            format!("{who} option ROM image size: {x} -> {y} bytes")
        })?,
        "rom.image_sha256" => format!("{who} option ROM image contents differ"),
        "rom.address" => format!("{who} option ROM address"),
        "bdf" => format!(
            "{model} at another PCI address: {} -> {}",
            l.and_then(Value::as_str).unwrap_or("?"),
            r.and_then(Value::as_str).unwrap_or("?")
        ),
        "model" => format!("PCI function {bdf} is another device"),
        "config" => format!("{who} PCI configuration space"),
        other if other.starts_with("bars") => format!("{who} BAR layout ({other})"),
        other => format!("{who}: {other}"),
    })
}

fn cpuid(path: &str, a: &Value, l: Option<&Value>, r: Option<&Value>) -> Option<String> {
    let rest = path.strip_prefix("cpu.cpuid[")?;
    let (vcpu, rest) = rest.split_once("][")?;
    let (leaf, reg) = rest.split_once("].")?;
    let entry = at(a, &format!("cpu.cpuid[{vcpu}][{leaf}]"))?;
    let function = entry["function"].as_u64()?;
    let index = entry["index"].as_u64().unwrap_or(0);
    let (x, y) = (l?.as_u64()?, r?.as_u64()?);
    Some(format!(
        "CPUID leaf {function:#x} subleaf {index} {} on vCPU {vcpu}: {}",
        reg.to_uppercase(),
        bit_change(x, y)
    ))
}

/// The difference at `path` (values `l` in manifest `a`, `r` in `b`) in
/// words, when the field is one a person knows by name.
pub fn explain(
    path: &str,
    a: &Value,
    b: &Value,
    l: Option<&Value>,
    r: Option<&Value>,
) -> Option<String> {
    let s = |v: Option<&Value>| {
        v.map_or("(absent)".to_string(), |v| {
            v.to_string().trim_matches('"').to_string()
        })
    };
    let num = |v: Option<&Value>| v.and_then(Value::as_u64);
    match path {
        "machine" => Some(format!("machine type: {} -> {}", s(l), s(r))),
        "vcpus" => Some(format!("vCPU count: {} -> {}", s(l), s(r))),
        "migratable" => Some(format!("migratable: {} -> {}", s(l), s(r))),
        "memory.bytes" => both(num(l), num(r), |x, y| {
            format!("RAM: {} -> {}", size(x), size(y))
        }),
        "cpu.model" => Some(format!("CPU model: {} -> {}", s(l), s(r))),
        p if p.starts_with("memory.e820") => Some("e820 memory map handed to the guest".into()),
        p if p.starts_with("memory.map") => Some("machine memory map".into()),
        p if p.starts_with("pci.functions[") => pci_function(p, a, b, l, r),
        p if p.starts_with("pci.layout") => Some(format!("PCI layout of the machine ({p})")),
        p if p.starts_with("cpu.cpuid[") => cpuid(p, a, l, r),
        p if p.starts_with("acpi[") => {
            let i = p.strip_prefix("acpi[")?.split(']').next()?;
            let t = at(a, &format!("acpi[{i}]")).or_else(|| at(b, &format!("acpi[{i}]")))?;
            Some(format!(
                "ACPI table {}",
                t["signature"].as_str().unwrap_or("?")
            ))
        }
        p if p.starts_with("legacy") => Some(format!("legacy devices ({p})")),
        p if p.starts_with("boot") => Some(format!("boot structure placement ({p})")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn blk(capacity: u64) -> Value {
        let mut cfg = capacity.to_le_bytes().to_vec();
        cfg.extend([0u8; 8]);
        json!({"pci": {"functions": [
            {"bdf": "00:00.0", "model": "host-bridge"},
            {"bdf": "00:01.0", "model": "virtio-blk", "virtio": {"config": hex::encode(cfg)}}
        ]}})
    }

    #[test]
    fn disk_capacity_in_sectors_and_bytes() {
        let (a, b) = (blk(16384), blk(32768));
        let p = "pci.functions[1].virtio.config";
        let w = explain(p, &a, &b, at(&a, p), at(&b, p)).expect("words");
        assert_eq!(
            w,
            "virtio-blk (00:01.0) capacity: 16384 -> 32768 sectors (8 MiB -> 16 MiB)"
        );
    }

    #[test]
    fn rom_slot_cpuid_bits_and_mac() {
        let a = json!({"pci": {"functions": [{"bdf": "00:03.0", "model": "virtio-net",
            "rom": {"slot_size": 262144}, "virtio": {"config": "525400123456"}}]},
            "cpu": {"cpuid": [[{"function": 0x8000_0001u32, "index": 0, "ecx": 0x21}]]}});
        let mut b = a.clone();
        b["pci"]["functions"][0]["rom"]["slot_size"] = json!(131072);
        b["pci"]["functions"][0]["virtio"]["config"] = json!("525400123457");
        b["cpu"]["cpuid"][0][0]["ecx"] = json!(0x1);
        let say = |p: &str| explain(p, &a, &b, at(&a, p), at(&b, p)).expect(p);
        assert_eq!(
            say("pci.functions[0].rom.slot_size"),
            "virtio-net (00:03.0) option ROM slot: 256 KiB -> 128 KiB"
        );
        assert_eq!(
            say("pci.functions[0].virtio.config"),
            "virtio-net (00:03.0) MAC address: 52:54:00:12:34:56 -> 52:54:00:12:34:57"
        );
        assert_eq!(
            say("cpu.cpuid[0][0].ecx"),
            "CPUID leaf 0x80000001 subleaf 0 ECX on vCPU 0: bits 5 cleared"
        );
        let (x, y) = (
            json!({"memory": {"bytes": 134217728u64}}),
            json!({"memory": {"bytes": 268435456u64}}),
        );
        let p = "memory.bytes";
        assert_eq!(
            explain(p, &x, &y, at(&x, p), at(&y, p)).expect("ram"),
            "RAM: 128 MiB -> 256 MiB"
        );
        assert!(explain("nonsense.field", &a, &b, None, None).is_none());
    }
}
