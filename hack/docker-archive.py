#!/usr/bin/env python3
"""Writes a base-less, single-layer image as a docker-archive tar (manifest.json, a config and one
layer), the format `ctr images import` and `docker load` read. No registry, no base image.

  docker-archive.py --tag T --out F [--entrypoint JSON] [--cmd JSON] [--user U] [--workdir D]
      [--env K=V]... [--expose PORT]... [--label K=V]...
      [--file SRC:DST[:MODE]]... [--tree SRC:DST]... [--dir DST[:MODE[:UID]]]...

  docker-archive.py gateway --dockerfile Dockerfile --binary target/.../tollgate --tag T --out F
      the product's image, laid out as the Dockerfile's final stage lays it out: its LABELs,
      COPYs, USER, EXPOSE and ENTRYPOINT are read from the Dockerfile, on top of what the base it
      names (distroless static, nonroot) provides: /etc/passwd and /etc/group with user 65532,
      CA certificates, /tmp, /home/nonroot, PATH and SSL_CERT_FILE.

The output is reproducible: entries sorted, owned by root unless told, mtime 0.
"""
import argparse
import hashlib
import io
import json
import os
import re
import shlex
import sys
import tarfile

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CA_BUNDLES = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"]


class Layer:
    def __init__(self):
        self.entries = {}  # path (no leading /) -> (TarInfo, bytes or None)

    def _parents(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                self.dir("/" + d)

    def dir(self, dst, mode=0o755, uid=0):
        p = dst.strip("/")
        self._parents(p)
        ti = tarfile.TarInfo(p)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = tarfile.DIRTYPE, mode, uid, uid, 0
        self.entries[p] = (ti, None)

    def data(self, dst, data, mode=0o644, uid=0):
        p = dst.strip("/")
        self._parents(p)
        ti = tarfile.TarInfo(p)
        ti.size, ti.mode, ti.uid, ti.gid, ti.mtime = len(data), mode, uid, uid, 0
        self.entries[p] = (ti, data)

    def file(self, src, dst, mode=None):
        with open(src, "rb") as f:
            data = f.read()
        if mode is None:
            mode = 0o755 if os.access(src, os.X_OK) else 0o644
        self.data(dst, data, mode)

    def tree(self, src, dst):
        for root, dirs, files in os.walk(src):
            dirs.sort()
            rel = os.path.relpath(root, src)
            base = dst if rel == "." else dst.rstrip("/") + "/" + rel
            self.dir(base)
            for name in sorted(files):
                self.file(os.path.join(root, name), base.rstrip("/") + "/" + name)

    def tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            for p in sorted(self.entries):
                ti, data = self.entries[p]
                ti.uname = ti.gname = ""
                t.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def write_archive(out, tag, layer, config):
    layer_tar = layer.tar()
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    image = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "hack/docker-archive.py"}],
    }
    config_json = json.dumps(image, sort_keys=True, separators=(",", ":")).encode()
    config_name = hashlib.sha256(config_json).hexdigest() + ".json"
    layer_name = diff_id[len("sha256:"):] + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": [layer_name]}]).encode()
    tmp = out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in ((config_name, config_json), (layer_name, layer_tar), ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            t.addfile(ti, io.BytesIO(data))
    os.replace(tmp, out)


def dockerfile_final_stage(path):
    """(instruction, argument) pairs of the last stage, continuations joined, comments dropped."""
    lines, cur = [], ""
    with open(path) as f:
        for raw in f:
            s = raw.strip()
            if not cur and (not s or s.startswith("#")):
                continue
            if s.startswith("#"):
                continue
            if s.endswith("\\"):
                cur += s[:-1] + " "
                continue
            cur += s
            lines.append(cur)
            cur = ""
    stage = []
    for line in lines:
        instr, _, arg = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stage = []
        stage.append((instr, arg.strip()))
    return stage


def gateway(args):
    stage = dockerfile_final_stage(args.dockerfile)
    context = os.path.dirname(os.path.abspath(args.dockerfile))
    base = stage[0][1]
    if "distroless/static" not in base or "nonroot" not in base:
        sys.exit(f"docker-archive: the Dockerfile's final base is {base!r}; this tool knows distroless static:nonroot")
    layer = Layer()
    # What distroless static:nonroot provides.
    layer.data("/etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\n"
               b"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
               b"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
    layer.data("/etc/group", b"root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n")
    bundle = next((b for b in CA_BUNDLES if os.path.exists(b)), None)
    if bundle is None:
        sys.exit("docker-archive: no CA bundle on this machine (install ca-certificates)")
    layer.file(bundle, "/etc/ssl/certs/ca-certificates.crt", 0o644)
    layer.dir("/tmp", 0o1777)
    layer.dir("/root", 0o700)
    layer.dir("/home/nonroot", 0o700, 65532)
    config = {"Env": [f"PATH={PATH}", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
              "WorkingDir": "/home/nonroot", "User": "65532"}
    labels, ports = {}, {}
    for instr, arg in stage[1:]:
        if instr == "LABEL":
            for tok in shlex.split(arg):
                k, _, v = tok.partition("=")
                labels[k] = v
        elif instr == "COPY":
            toks = arg.split()
            from_stage = any(t.startswith("--from=") for t in toks)
            paths = [t for t in toks if not t.startswith("--")]
            src, dst = paths[0], paths[-1]
            if from_stage:
                # The build stage's only artefact: the static binary.
                layer.file(args.binary, dst, 0o755)
            else:
                full = os.path.join(context, src)
                if os.path.isdir(full):
                    layer.tree(full, dst)
                else:
                    layer.file(full, dst)
        elif instr == "USER":
            config["User"] = arg
        elif instr == "EXPOSE":
            for p in arg.split():
                ports[p if "/" in p else p + "/tcp"] = {}
        elif instr == "ENTRYPOINT":
            config["Entrypoint"] = json.loads(arg)
        elif instr in ("WORKDIR",):
            config["WorkingDir"] = arg
        elif instr == "ENV":
            k, _, v = arg.partition("=")
            config["Env"] = [e for e in config["Env"] if not e.startswith(k + "=")] + [f"{k}={v}"]
        else:
            sys.exit(f"docker-archive: the Dockerfile's final stage has {instr}, which this tool does not lay out")
    if labels:
        config["Labels"] = labels
    if ports:
        config["ExposedPorts"] = ports
    write_archive(args.out, args.tag, layer, config)


def generic(args):
    layer = Layer()
    for d in args.dir:
        parts = d.split(":")
        layer.dir(parts[0], int(parts[1], 8) if len(parts) > 1 else 0o755, int(parts[2]) if len(parts) > 2 else 0)
    for f in args.file:
        parts = f.split(":")
        layer.file(parts[0], parts[1], int(parts[2], 8) if len(parts) > 2 else None)
    for t in args.tree:
        src, dst = t.split(":")
        layer.tree(src, dst)
    config = {"Env": [f"PATH={PATH}"] + args.env}
    if args.entrypoint:
        config["Entrypoint"] = json.loads(args.entrypoint)
    if args.cmd:
        config["Cmd"] = json.loads(args.cmd)
    if args.user:
        config["User"] = args.user
    if args.workdir:
        config["WorkingDir"] = args.workdir
    if args.expose:
        config["ExposedPorts"] = {(p if "/" in p else p + "/tcp"): {} for p in args.expose}
    if args.label:
        config["Labels"] = dict(l.split("=", 1) for l in args.label)
    write_archive(args.out, args.tag, layer, config)


def main():
    argv = sys.argv[1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", required=True)
    p.add_argument("--out", required=True)
    if argv[:1] == ["gateway"]:
        p.add_argument("--dockerfile", required=True)
        p.add_argument("--binary", required=True)
        gateway(p.parse_args(argv[1:]))
        return
    p.add_argument("--entrypoint")
    p.add_argument("--cmd")
    p.add_argument("--user")
    p.add_argument("--workdir")
    for name in ("env", "expose", "label", "file", "tree", "dir"):
        p.add_argument("--" + name, action="append", default=[])
    generic(p.parse_args(argv))


if __name__ == "__main__":
    main()
