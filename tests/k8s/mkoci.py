#!/usr/bin/env python3
"""Write a single-platform (linux/amd64) OCI image archive from uncompressed layer tars, for
`ctr -n k8s.io images import` (no registry, no podman). Used by scripts/k8s-cluster.sh.

    mkoci.py --name localhost/vha-node:test --out image.tar --layer base.tar --layer agent.tar \
             [--entrypoint '["/usr/local/bin/virt-hypervisor-agent"]'] [--cmd '["run"]']

A layer's digest is cached next to it (`<layer>.sha256`, keyed by size and mtime), so the large
Debian base layer is hashed once.
"""
import argparse, hashlib, io, json, os, tarfile


def digest(path):
    st = os.stat(path)
    key = f"{st.st_size} {st.st_mtime_ns}"
    cache = path + ".sha256"
    try:
        with open(cache) as f:
            k, d = f.read().split("\n")[:2]
            if k == key:
                return d
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    d = "sha256:" + h.hexdigest()
    with open(cache, "w") as f:
        f.write(f"{key}\n{d}\n")
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layer", action="append", default=[])
    ap.add_argument("--entrypoint", default="null")
    ap.add_argument("--cmd", default="null")
    a = ap.parse_args()
    layers = [(p, digest(p), os.path.getsize(p)) for p in a.layer]
    cfg = {
        "created": "1970-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
        "config": {k: v for k, v in {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": json.loads(a.entrypoint), "Cmd": json.loads(a.cmd), "WorkingDir": "/",
        }.items() if v is not None},
        "rootfs": {"type": "layers", "diff_ids": [d for _, d, _ in layers]},
    }
    cfg_b = json.dumps(cfg, separators=(",", ":")).encode()
    cfg_d = "sha256:" + hashlib.sha256(cfg_b).hexdigest()
    man = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d, "size": len(cfg_b)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n} for _, d, n in layers],
    }
    man_b = json.dumps(man, separators=(",", ":")).encode()
    man_d = "sha256:" + hashlib.sha256(man_b).hexdigest()
    tag = a.name.rsplit(":", 1)[1]
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_d, "size": len(man_b),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": a.name, "org.opencontainers.image.ref.name": tag}}]}
    with tarfile.open(a.out, "w") as t:
        def put(name, data):
            ti = tarfile.TarInfo(name); ti.size = len(data); ti.mode = 0o644
            t.addfile(ti, io.BytesIO(data))
        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        put("index.json", json.dumps(index).encode())
        put("blobs/sha256/" + cfg_d[7:], cfg_b)
        put("blobs/sha256/" + man_d[7:], man_b)
        seen = set()
        for p, d, _ in layers:
            if d not in seen:
                seen.add(d)
                t.add(p, arcname="blobs/sha256/" + d[7:])


if __name__ == "__main__":
    main()
