#!/usr/bin/env python3
"""The container images critest uses, built locally from Debian's busybox-static.

critest (cri-tools) pulls images from registry.k8s.io, gcr.io/k8s-staging-cri-tools and
k8s.gcr.io. None of that is reachable here, so this builds look-alikes (same names, tags, users,
groups, ports and files as cri-tools' images/ Dockerfiles) as OCI images and stores them in a
docker-registry storage directory, pushed with skopeo to a registry on 127.0.0.1 on this
machine. tests/cri/inner serves a copy of that storage from a registry on 127.0.0.1 inside the
test host, and containerd's hosts.toml sends those registry names there.

    images.py build CACHE_ROOT   prints the storage directory (built once per key, then cached)
    images.py list               prints the image names it provides

The cache key covers this file, busybox's version and the registry/skopeo versions: a warm
cache builds nothing.

Not reproducible: gcr.io/k8s-staging-cri-tools/test-image-digest@sha256:9700f9… (a digest of
an image built upstream); the spec that pulls it fails here (docs/cri.md).
"""

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

BUSYBOX = "/bin/busybox"
# Where Debian's iptables keeps the extensions it loads at run time.
XTABLES = "/usr/lib/x86_64-linux-gnu/xtables"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# /etc/passwd and /etc/group as in the busybox:1.3x images cri-tools builds on.
PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
utmp:x:43:
plugdev:x:46:
staff:x:50:
lock:x:54:
netdev:x:82:
users:x:100:
nogroup:x:65534:
"""


# An nginx look-alike: /usr/sbin/nginx is a script (so `pidof nginx` finds it), writes
# /var/run/nginx.pid, serves /usr/share/nginx/html with busybox httpd on PORT, logs a line naming
# the server and stops on TERM/QUIT. Its argv carries "master process" as nginx's process title
# does (the ContainerPID spec greps /proc/1/cmdline for it).
NGINX = """#!/bin/sh
# nginx look-alike for critest: busybox httpd on port $1
port=$1
name=$2
trap 'exit 0' TERM INT QUIT
mkdir -p /var/run
echo $$ >/var/run/nginx.pid
echo "$name: busybox httpd serving /usr/share/nginx/html on port $port"
httpd -f -p "$port" -h /usr/share/nginx/html &
wait
"""


def web_server(port, name):
    return {
        "Entrypoint": ["/usr/sbin/nginx", str(port), name, "master process"],
        "ExposedPorts": {f"{port}/tcp": {}},
        "files": {
            "usr/share/nginx/html/index.html": f"<html><body>{name} ok</body></html>\n",
            "usr/sbin/nginx": (NGINX, 0o755),
        },
    }


# busybox-static has no pgrep (the execSync timeout spec runs `pgrep sleep`).
PGREP = """#!/bin/sh
# pgrep PATTERN: pids of the processes whose name matches PATTERN (busybox ps + awk)
ps -o pid,comm | awk -v p="$1" 'NR > 1 && $2 ~ p { print $1; n++ } END { exit n ? 0 : 1 }'
"""

NNP_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\n", (int)geteuid()); return 0; }
"""


def marker(name):
    """cri-tools' image-test: busybox plus an empty file named after the image."""
    return {"files": {name: ""}}


def user(u):
    return {"User": u}


PAUSE = {
    "Entrypoint": ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done"],
}

# (image name as critest and containerd know it, how it differs from plain busybox). Images with
# the same spec are the same image (one digest), whatever their names.
K8S_STAGING = "gcr.io/k8s-staging-cri-tools/"
IMAGES = [
    # framework.DefaultLinuxContainerImage, the default container image of most specs.
    ("registry.k8s.io/e2e-test-images/busybox:1.29-2", {
        "files": {"bin/pgrep": (PGREP, 0o755)},
        "host": ["/usr/bin/ipcs"],
    }),
    # The NoNewPrivs specs: a set-user-ID root program that prints its effective uid.
    ("registry.k8s.io/e2e-test-images/nonewprivs:1.3", {
        "compile": {"usr/local/bin/nnp": (NNP_C, 0o4755)},
        "Entrypoint": ["/usr/local/bin/nnp"],
    }),
    # validate.webServerLinuxImage (networking, port-forward) and the multi-container httpd.
    ("registry.k8s.io/e2e-test-images/nginx:1.14-2", web_server(80, "nginx")),
    ("registry.k8s.io/e2e-test-images/httpd:2.4.39-4", web_server(80, "httpd")),
    # hostNetWebServerImage: images/hostnet-nginx listens on 12003.
    (K8S_STAGING + "hostnet-nginx-amd64:latest", web_server(12003, "hostnet-nginx")),
    # images/image-test (one marker file each).
    (K8S_STAGING + "test-image-1:latest", marker("test-image-1")),
    (K8S_STAGING + "test-image-2:latest", marker("test-image-2")),
    (K8S_STAGING + "test-image-3:latest", marker("test-image-3")),
    (K8S_STAGING + "test-image-latest:latest", marker("test-image-latest")),
    (K8S_STAGING + "test-image-tag:test", marker("test-image-tag")),
    (K8S_STAGING + "test-image-tag:all", marker("test-image-tag")),
    (K8S_STAGING + "test-image-tags:1", marker("test-image-tags")),
    (K8S_STAGING + "test-image-tags:2", marker("test-image-tags")),
    (K8S_STAGING + "test-image-tags:3", marker("test-image-tags")),
    # images/image-user with the USERs of images/build.
    (K8S_STAGING + "test-image-user-uid:latest", user("1002")),
    (K8S_STAGING + "test-image-user-username:latest", user("www-data")),
    (K8S_STAGING + "test-image-user-uid-group:latest", user("1003:1004")),
    (K8S_STAGING + "test-image-user-username-group:latest", user("www-data:1004")),
    # images/image-predefined-group: default-user (1000) in group-defined-in-image (50000).
    (
        K8S_STAGING + "test-image-predefined-group:latest",
        {
            "User": "1000",
            "passwd": "default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n",
            "group": "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n",
            "dirs": {"home/default-user": 1000},
        },
    ),
    # The pod trials' in-pod networking workload (Istio's init container, CNI-in-pod): busybox
    # plus Debian's iptables (legacy and nft front ends, run as `xtables-*-multi iptables …`)
    # with the extensions it dlopens.
    (K8S_STAGING + "moat-netadmin:1", {
        # iptables takes its lock in /run (not in the busybox image).
        "dirs": {"run": 0},
        "host": ["/usr/sbin/xtables-legacy-multi", "/usr/sbin/xtables-nft-multi"] + sorted(
            os.path.join(XTABLES, f) for f in os.listdir(XTABLES) if f.endswith(".so")
        ) if os.path.isdir(XTABLES) else [],
    }),
    # The same image under two registries (the "different registries" image specs); both names
    # resolve to pause:3.9 in the local registry.
    ("registry.k8s.io/pause:3.9", PAUSE),
    # The sandbox ("pause") image the harness configures in containerd; another image than 3.9
    # so that removing 3.9 in a spec leaves the sandbox image alone.
    ("registry.k8s.io/pause:3.10", dict(PAUSE, Labels={"moat.test/pause": "3.10"})),
]

# Registry host names that containerd sends to the local registry (tests/cri/inner).
REGISTRY_HOSTS = ["registry.k8s.io", "gcr.io", "k8s.gcr.io", "docker.io"]


def repo_path(name):
    """registry.k8s.io/e2e-test-images/busybox:1.29-2 -> (e2e-test-images/busybox, 1.29-2)."""
    host, rest = name.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    return repo, tag


# ---- layers ----------------------------------------------------------------------------------


def _tarinfo(name, kind, mode, uid=0, size=0):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid = ti.gid = uid
    ti.uname = ti.gname = ""
    ti.mtime = 0
    ti.size = size
    return ti


def _tar(entries):
    """entries: list of (TarInfo, bytes or None), written in order; returns the tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for ti, data in entries:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def base_layer():
    """busybox-static with every applet hard-linked in /bin (as in the busybox image: a masked
    /bin/ls must not mask busybox itself), the busybox image's users and groups."""
    applets = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True)
    dirs = {
        "bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "proc": 0o755, "root": 0o700,
        "sys": 0o755, "tmp": 0o1777, "usr": 0o755, "usr/share": 0o755, "var": 0o755,
        "var/www": 0o755, "var/spool": 0o755, "var/spool/mail": 0o755, "var/run": 0o755,
    }
    entries = [(_tarinfo(d, tarfile.DIRTYPE, m), None) for d, m in sorted(dirs.items())]
    data = open(BUSYBOX, "rb").read()
    entries.append((_tarinfo("bin/busybox", tarfile.REGTYPE, 0o755, size=len(data)), data))
    for applet in sorted(set(applets.stdout.split())):
        if applet in ("busybox",) or "/" in applet:
            continue
        ti = _tarinfo("bin/" + applet, tarfile.LNKTYPE, 0o755)
        ti.linkname = "bin/busybox"
        entries.append((ti, None))
    for path, text in (("etc/passwd", PASSWD), ("etc/group", GROUP)):
        b = text.encode()
        entries.append((_tarinfo(path, tarfile.REGTYPE, 0o644, size=len(b)), b))
    return _tar(entries)


def host_binaries(paths):
    """{image path: (bytes, mode)} for host programs and the shared libraries ldd lists."""
    out = {}
    for path in paths:
        out[path.lstrip("/")] = (open(path, "rb").read(), 0o755)
        ldd = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
        for line in ldd.splitlines():
            parts = line.split()
            lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
            if lib.startswith("/"):
                real = os.path.realpath(lib)
                out[lib.lstrip("/")] = (open(real, "rb").read(), 0o755)
    return out


def compiled(sources):
    """{image path: (bytes, mode)} for small C programs built static with the host's cc."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path, (source, mode) in sources.items():
            src = os.path.join(tmp, "prog.c")
            exe = os.path.join(tmp, "prog")
            with open(src, "w") as f:
                f.write(source)
            subprocess.run(["cc", "-static", "-O2", "-o", exe, src], check=True)
            out[path] = (open(exe, "rb").read(), mode)
    return out


def top_layer(spec):
    """The image's own files on top of the base layer, or None when it has none."""
    entries = []
    made = {"bin", "etc", "usr", "usr/share", "var", "var/www", "var/spool", "var/spool/mail",
            "var/run", "dev", "home", "proc", "root", "sys", "tmp"}

    def parents(path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                entries.append((_tarinfo(d, tarfile.DIRTYPE, 0o755), None))

    for path, owner in sorted(spec.get("dirs", {}).items()):
        parents(path)
        made.add(path)
        entries.append((_tarinfo(path, tarfile.DIRTYPE, 0o755, uid=owner), None))
    files = {}
    for path, value in spec.get("files", {}).items():
        text, mode = value if isinstance(value, tuple) else (value, 0o644)
        files[path] = (text.encode(), mode)
    if "passwd" in spec:
        files["etc/passwd"] = ((PASSWD + spec["passwd"]).encode(), 0o644)
    if "group" in spec:
        files["etc/group"] = ((GROUP + spec["group"]).encode(), 0o644)
    files.update(host_binaries(spec.get("host", [])))
    files.update(compiled(spec.get("compile", {})))
    for path, (data, mode) in sorted(files.items()):
        parents(path)
        entries.append((_tarinfo(path, tarfile.REGTYPE, mode, size=len(data)), data))
    return _tar(entries) if entries else None


# ---- OCI layout ------------------------------------------------------------------------------


class Layout:
    """An OCI image layout directory; each image gets a ref name for skopeo's oci: transport."""

    def __init__(self, root):
        self.root = root
        self.blobs = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)
        self.manifests = []

    def blob(self, data):
        digest = hashlib.sha256(data).hexdigest()
        path = os.path.join(self.blobs, digest)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    def image(self, ref, layers, config):
        diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
        cfg = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        cfg_desc = self.blob(json.dumps(cfg, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": dict(mediaType="application/vnd.oci.image.config.v1+json", **cfg_desc),
            "layers": [
                dict(mediaType="application/vnd.oci.image.layer.v1.tar", **self.blob(layer))
                for layer in layers
            ],
        }
        desc = self.blob(json.dumps(manifest, sort_keys=True).encode())
        self.manifests.append(
            dict(
                mediaType="application/vnd.oci.image.manifest.v1+json",
                annotations={"org.opencontainers.image.ref.name": ref},
                platform={"architecture": "amd64", "os": "linux"},
                **desc,
            )
        )
        return desc["digest"]

    def close(self):
        with open(os.path.join(self.root, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        with open(os.path.join(self.root, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": self.manifests}, f, sort_keys=True)


def build_layout(root):
    """Builds every image into the layout at ROOT; returns [(ref, image name)]."""
    layout = Layout(root)
    base = base_layer()
    refs = []
    for i, (name, spec) in enumerate(IMAGES):
        config = {"Env": [PATH_ENV], "Cmd": ["sh"]}
        for key in ("User", "Entrypoint", "ExposedPorts", "Labels"):
            if key in spec:
                config[key] = spec[key]
        if "Entrypoint" in spec:
            config.pop("Cmd")
        top = top_layer(spec)
        ref = f"img{i}"
        layout.image(ref, [base] + ([top] if top else []), config)
        refs.append((ref, name))
    layout.close()
    return refs


# ---- the registry storage --------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry_config(storage, addr):
    return (
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {addr}\n"
    )


def wait_registry(url, proc, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"images: docker-registry exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v2/", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"images: docker-registry did not answer at {url} within {seconds} s")


def push(layout, refs, storage):
    """Starts a registry on 127.0.0.1 with STORAGE and pushes every image there with skopeo."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as cfg:
        cfg.write(registry_config(storage, addr))
    proc = subprocess.Popen(
        ["docker-registry", "serve", cfg.name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_registry("http://" + addr, proc)
        for ref, name in refs:
            repo, tag = repo_path(name)
            subprocess.run(
                ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                 "--preserve-digests", f"oci:{layout}:{ref}", f"docker://{addr}/{repo}:{tag}"],
                check=True, timeout=120,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(cfg.name)


def cache_key():
    h = hashlib.sha256()
    h.update(open(__file__, "rb").read())
    h.update(open(BUSYBOX, "rb").read())
    for _, spec in IMAGES:
        for path, (data, _) in sorted(host_binaries(spec.get("host", [])).items()):
            h.update(path.encode() + data)
    h.update(subprocess.run(["cc", "--version"], capture_output=True).stdout)
    for cmd in (["docker-registry", "--version"], ["skopeo", "--version"]):
        h.update(subprocess.run(cmd, capture_output=True).stdout)
    return h.hexdigest()[:16]


def build(cache_root):
    """Returns the registry storage directory for the current key, building it when missing."""
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"images: {tool} not found: run scripts/deps")
    final = os.path.join(cache_root, "registry-" + cache_key())
    if os.path.exists(os.path.join(final, ".complete")):
        return final
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    start = time.monotonic()
    refs = build_layout(os.path.join(tmp, "oci"))
    push(os.path.join(tmp, "oci"), refs, os.path.join(tmp, "storage"))
    with open(os.path.join(tmp, "images.txt"), "w") as f:
        f.writelines(name + "\n" for _, name in refs)
    shutil.rmtree(os.path.join(tmp, "oci"))
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    print(f"images: built {len(refs)} images into {final} in {time.monotonic() - start:.1f} s",
          file=sys.stderr)
    return final


def main(argv):
    if len(argv) == 3 and argv[1] == "build":
        print(build(argv[2]))
    elif len(argv) == 2 and argv[1] == "list":
        for name, _ in IMAGES:
            print(name)
    elif len(argv) == 2 and argv[1] == "hosts":
        print(" ".join(REGISTRY_HOSTS))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
