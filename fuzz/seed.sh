#!/usr/bin/env bash
# Writes the seed corpora to fuzz/target/seeds/TARGET from real inputs:
# the release snapshot fixtures (resources/snapshots/*/*.snap), a migration
# stream made of a fixture's header and its state sections, their device
# state sections for the Persist decoders, and recorded API requests and VM
# configurations (below). Called by fuzz/run.sh.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf target/seeds
mkdir -p target/seeds
python3 - <<'PY'
import glob, hashlib, json, os, struct

out = "target/seeds"
def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def frame(tag, payload):
    return tag + struct.pack("<I", len(payload)) + payload

def fletcher64(data):
    a = b = 0
    m = (1 << 64) - 1
    for i in range(0, len(data), 8):
        a = (a + int.from_bytes(data[i:i + 8].ljust(8, b"\0"), "little")) & m
        b = (b + a) & m
    return a ^ (((b << 32) | (b >> 32)) & m)

persist = {"device.uart-16550": 0, "device.cmos-rtc": 1, "device.i8042": 2,
           "device.acpi-pm": 3, "pci.00:00.0": 4}
for path in sorted(glob.glob("../resources/snapshots/*/*.snap")):
    tag = path.split("/")[-2] + "-" + os.path.basename(path)[:-5]
    raw = open(path, "rb").read()
    put("snapshot_reader", tag, raw)
    n = struct.unpack("<I", raw[8:12])[0]
    header = json.loads(raw[12:12 + n])
    # Just the header: the reader's first stage.
    put("snapshot_reader", tag + "-header", raw[:12 + n + 32])
    stream = b"ABIDEMIG" + raw[8:12 + n + 32]
    page = b"\0" * 4095 + b"\1"
    body = struct.pack("<QQQ", 2, 0x1000, 0x2000 | 1) + page
    stream += frame(b"P", body + struct.pack("<Q", fletcher64(body)))
    stream += frame(b"I", b'{"iteration":1}')
    for s in header["sections"]:
        data = raw[s["offset"]:s["offset"] + s["length"]]
        if s["name"] in persist:
            put("persist_decoders", f"{tag}-{s['name']}", bytes([persist[s["name"]], s["version"]]) + data)
        if s["name"].startswith("memory"):
            continue
        entry = json.dumps({"name": s["name"], "version": s["version"], "optional": s["optional"],
                            "offset": 0, "length": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()}).encode()
        stream += frame(b"S", struct.pack("<I", len(entry)) + entry + data)
    stream += frame(b"E", json.dumps({"sections": len(header["sections"])}).encode())
    stream += frame(b"C", b'{"paused_ms":12.5}')
    put("migration_stream", tag, stream)
    put("vm_config", tag, json.dumps(header["host"]).encode())

# Recorded API requests (as the CLI and the tests send them).
requests = [
    b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n",
    b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    b'PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 67\r\n\r\n{"path":"/tmp/vm.snap","target_version":"0.2.0","stay_paused":true}',
    b'PUT /api/v1/vm.send-migration HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 81\r\n\r\n{"destination_url":"unix:/tmp/m.sock","max_downtime_ms":300,"max_bandwidth_mib_s":null}',
    b"GET /api/v1/events?since=3 HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n",
    b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
]
for i, r in enumerate(requests):
    put("api_request", f"request-{i}", r)

configs = [
    {"machine": "pc-1.0", "cpus": 2, "memory": "256M", "serial": "null"},
    {"machine": "pc-2.0", "cpu": "abide-v1", "memory": 512, "disks": [{"path": "/tmp/a.img", "readonly": True, "serial": "d1", "addr": 3}],
     "nets": [{"fd": 5, "mac": "52:54:00:12:34:56"}], "rng": {"addr": "0x1f"}},
    {"machine": "pc", "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd", "cmdline": "console=ttyS0", "memory": "4G"},
]
for i, c in enumerate(configs):
    put("vm_config", f"config-{i}", json.dumps(c).encode())

put("pci_config_msix", "reads", bytes([8, 0]) + b"".join(bytes([0, o, 0, 2, 0, 0, 0, 0]) for o in range(0, 256, 4)))
put("pci_config_msix", "table", bytes([8, 0]) + b"".join(bytes([3, o, 0, 2, 0xff, 0, 0xe0, 0xfe]) for o in range(0, 128, 4)) + bytes([5, 0, 0, 2, 0, 0xc0, 0, 0, 6, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]))

# Virtqueue images: descriptor table at 0, available ring at 0x1000 (one
# chain, head 0), used ring at 0x2000, buffers from 0x3000.
def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)
def image(descs, extra=()):
    ram = bytearray(0x5100)
    for i, d in enumerate(descs):
        ram[16 * i:16 * i + 16] = d
    ram[0x1000:0x1006] = struct.pack("<HHH", 0, 1, 0)
    for at, data in extra:
        ram[at:at + len(data)] = data
    return bytes(ram)
NEXT, WRITE = 1, 2
blk = image([desc(0x3000, 16, NEXT, 1), desc(0x4000, 512, WRITE | NEXT, 2), desc(0x5000, 1, WRITE, 0)],
            [(0x3000, struct.pack("<IIQ", 0, 0, 0))])
put("virtqueue_chains", "blk-read", bytes([0, 4]) + blk)
blk_w = image([desc(0x3000, 16, NEXT, 1), desc(0x4000, 512, NEXT, 2), desc(0x5000, 1, WRITE, 0)],
              [(0x3000, struct.pack("<IIQ", 1, 0, 3))])
put("virtqueue_chains", "blk-write", bytes([0, 4]) + blk_w)
put("virtqueue_chains", "net-rx", bytes([1, 4]) + image([desc(0x3000, 2000, WRITE, 0)]))
put("virtqueue_chains", "net-tx", bytes([2, 4]) + image([desc(0x3000, 12, NEXT, 1), desc(0x4000, 100, 0, 0)]))
put("virtqueue_chains", "rng", bytes([3, 4]) + image([desc(0x4000, 64, WRITE, 0)]))
PY
for d in target/seeds/*; do echo "seeds: $(basename "$d"): $(ls "$d" | wc -l) files" >&2; done
