#!/usr/bin/env python3
"""Tests of deploy/ (run by tests/deploy/run, which names the tools and binaries).

- schema: every manifest in deploy/*.yaml against the Kubernetes JSON schemas (strict: unknown
  fields are errors) of kubernetes-validate, for Kubernetes 1.30 and 1.37; a kind or API version
  without a schema is an error too. Broken copies (a wrong field type, an unknown field, a
  missing required field, an unknown API version), written to a temporary directory, must fail.
- consistency: the manifests agree with each other, with install.sh, the Dockerfile's layout
  and the documented RuntimeClass overhead (docs/operating.md, config/moat.toml's memory_mib).
- shellcheck of the deploy and test scripts.
- build-payload: the image context from this checkout's binaries.
- the E2E trial: deploy/install.sh against a temporary HOST_ROOT holding a real containerd
  configuration (`containerd config default`, containerd 1.6 and 2.x), with the payload of this
  checkout's binaries: files and modes, the runtime in `containerd config dump`, a second run
  changes nothing, uninstall leaves the tree as it was; a kept, changed /etc/moat/config.toml;
  `install.sh run` in a simulated pod: node label through a TLS API server on 127.0.0.1, the
  containerd restart through nsenter (a recording stand-in), SIGTERM uninstalls.

Prints `test NAME ... ok|FAILED: why|skipped: why` and a closing
`deploy: N passed, N failed, N skipped`; exits 1 when a test failed.
"""

import argparse
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

try:
    import yaml
except ImportError:  # tests/deploy/setup-tools failed: the schema tests are skipped
    yaml = None
try:
    import kubernetes_validate
except ImportError:
    kubernetes_validate = None

KUBE_VERSIONS = ["1.30.0", "1.37.0"]
BINS = ["containerd-shim-moat-v2", "moat-vmm", "moat"]
GUEST = ["vmlinux", "initramfs.cpio"]
LABEL = "moat.io/runtime"
RUNTIME_TYPE = "io.containerd.moat.v2"


class Failed(Exception):
    """A test's assertion failed."""


class Skipped(Exception):
    """A test cannot run here."""


def ensure(cond, why):
    if not cond:
        raise Failed(why)


def run(cmd, env=None, timeout=300, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise Failed(f"{' '.join(map(str, cmd))}: exit {r.returncode}: "
                     f"{(r.stderr or r.stdout).strip()[-800:]}")
    return r


class Ctx:
    """What the tests share: paths, tools, the payload once built."""

    def __init__(self, args):
        self.repo = os.path.abspath(args.repo)
        self.deploy = os.path.join(self.repo, "deploy")
        self.bin = os.path.abspath(args.moat_bin)
        self.guest = os.path.abspath(args.moat_guest)
        self.venv = args.venv
        self.keep = args.keep
        self.tmp = tempfile.mkdtemp(prefix="moat-deploy-test.")
        self.payload = None
        self.payload_error = None
        self.payload_note = ""
        self._moat_install = None

    def manifests(self):
        return sorted(f for f in os.listdir(self.deploy) if f.endswith((".yaml", ".yml")))

    def need_yaml(self):
        if yaml is None or kubernetes_validate is None:
            raise Skipped("kubernetes-validate/PyYAML not installed (tests/deploy/setup-tools failed)")

    def docs(self, name):
        self.need_yaml()
        with open(os.path.join(self.deploy, name)) as f:
            return [d for d in yaml.safe_load_all(f) if d]

    def moat_install_missing(self):
        """Why the trial cannot run (`moat install` absent from the built moat), or None."""
        if self._moat_install is None:
            moat = os.path.join(self.bin, "moat")
            if not os.access(moat, os.X_OK):
                self._moat_install = f"{moat} is not built"
            else:
                r = run([moat, "install", "--help"], check=False, timeout=60)
                # Known when it answers its help or its usage (`--help` may not be an option).
                if r.returncode == 0 or "usage: moat install" in r.stdout + r.stderr:
                    self._moat_install = ""
                else:
                    first = (r.stderr or r.stdout).strip().splitlines()[:1]
                    self._moat_install = (f"`moat install` is not in {moat} yet "
                                          f"(`moat install --help`: exit {r.returncode}: "
                                          f"{first[0] if first else 'no output'})")
        return self._moat_install or None

    def need_trial(self):
        why = self.moat_install_missing()
        if why:
            raise Skipped(why)
        return self.need_payload()

    def need_payload(self):
        if self.payload is None and self.payload_error is None:
            try:
                self.payload = build_payload(self)
            except (Failed, Skipped) as e:
                self.payload_error = e
        if self.payload_error is not None:
            raise type(self.payload_error)(f"no payload: {self.payload_error}")
        return self.payload


# ---- schema ---------------------------------------------------------------------------------

def validate_file(path, version):
    """Validates every document of a YAML file (strict schemas); returns the kinds, raises Failed
    naming the first document that does not validate."""
    with open(path) as f:
        try:
            docs = [d for d in yaml.safe_load_all(f) if d]
        except yaml.YAMLError as e:
            raise Failed(f"{os.path.basename(path)}: not YAML: {e}")
    ensure(docs, f"{path}: no documents")
    kinds = []
    for i, doc in enumerate(docs):
        ensure(isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc,
               f"{os.path.basename(path)} document {i + 1}: no kind/apiVersion")
        what = f"{os.path.basename(path)} document {i + 1} ({doc['kind']} {doc.get('metadata', {}).get('name')})"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path_s = ".".join(str(p) for p in e.path) or "(top level)"
            raise Failed(f"{what}: {path_s}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            raise Failed(f"{what}: {e.message}")
        kinds.append(doc["kind"])
    return kinds


def t_schema(ctx, name, version):
    ctx.need_yaml()
    kinds = validate_file(os.path.join(ctx.deploy, name), version)
    return f"{', '.join(kinds)} valid against Kubernetes {version} (strict)"


# (file, what, text in the file, its replacement): each makes a broken copy.
BROKEN = [
    ("moat-deploy.yaml", "wrong type: hostPID a string", "hostPID: true", 'hostPID: "yes"'),
    ("moat-deploy.yaml", "wrong type: hostPath path a number", "path: /etc/moat", "path: 42"),
    ("moat-deploy.yaml", "unknown field: privilegd", "privileged: true", "privilegd: true"),
    ("moat-deploy.yaml", "missing required: DaemonSet selector", "  selector:\n    matchLabels:\n      app.kubernetes.io/name: moat-deploy\n", ""),
    ("runtimeclass.yaml", "wrong type: overhead memory a mapping", 'memory: "272Mi"', "memory: {value: 272Mi}"),
    ("runtimeclass.yaml", "missing required: handler", "handler: moat\n", ""),
    ("runtimeclass.yaml", "unknown API version", "apiVersion: node.k8s.io/v1\n", "apiVersion: node.k8s.io/v9\n"),
]


def t_schema_rejects(ctx, file, what, old, new):
    ctx.need_yaml()
    with open(os.path.join(ctx.deploy, file)) as f:
        text = f.read()
    ensure(text.count(old) == 1, f"the mutation does not apply: {old!r} is in {file} {text.count(old)} times")
    d = tempfile.mkdtemp(prefix="broken.", dir=ctx.tmp)
    broken = os.path.join(d, file)
    with open(broken, "w") as f:
        f.write(text.replace(old, new))
    for version in KUBE_VERSIONS:
        try:
            validate_file(broken, version)
        except Failed as e:
            msg = str(e)
            continue
        raise Failed(f"the broken copy {broken} ({what}) validates against {version}")
    return f"rejected: {msg}"


# ---- consistency ----------------------------------------------------------------------------

def install_sh_default(ctx, var):
    with open(os.path.join(ctx.deploy, "install.sh")) as f:
        m = re.search(r"^\w+=\$\{" + var + r":-([^}]*)\}$", f.read(), re.M)
    ensure(m, f"install.sh has no default for {var}")
    return m.group(1)


def t_consistent(ctx):
    docs = {}
    for name in ctx.manifests():
        for d in ctx.docs(name):
            docs[(d["kind"], d["metadata"]["name"])] = d
    ns = [n for (k, n) in docs if k == "Namespace"]
    ensure(len(ns) == 1, f"one Namespace expected, found {ns}")
    ns = ns[0]
    for (k, n), d in docs.items():
        if k in ("ServiceAccount", "DaemonSet"):
            ensure(d["metadata"].get("namespace") == ns, f"{k} {n} is not in namespace {ns}")
    ensure(docs[("Namespace", ns)]["metadata"]["labels"].get("pod-security.kubernetes.io/enforce")
           == "privileged", "the namespace does not allow privileged pods (pod security)")
    ds = docs.get(("DaemonSet", "moat-deploy"))
    ensure(ds, "no DaemonSet moat-deploy")
    tpl = ds["spec"]["template"]
    for k, v in ds["spec"]["selector"]["matchLabels"].items():
        ensure(tpl["metadata"]["labels"].get(k) == v, f"the DaemonSet selector {k}={v} does not match its pods")
    pod = tpl["spec"]
    sa = pod["serviceAccountName"]
    ensure(("ServiceAccount", sa) in docs, f"serviceAccountName {sa} is not defined")
    binds = [d for (k, _), d in docs.items() if k == "ClusterRoleBinding"]
    ok = False
    for b in binds:
        role = docs.get(("ClusterRole", b["roleRef"]["name"]))
        if not role or not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa
                               and s.get("namespace") == ns for s in b["subjects"]):
            continue
        for rule in role["rules"]:
            if "" in rule["apiGroups"] and "nodes" in rule["resources"] and "patch" in rule["verbs"]:
                ok = True
    ensure(ok, f"no ClusterRole bound to {ns}/{sa} may patch nodes (the label)")
    ensure(pod.get("hostPID") is True, "hostPID is needed for nsenter --target 1 (containerd restart)")
    (c,) = pod["containers"]
    ensure(c.get("securityContext", {}).get("privileged") is True, "the container is not privileged")
    env = {e["name"]: e for e in c.get("env", [])}
    ensure(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
           "NODE_NAME does not come from spec.nodeName")
    host_root = env.get("HOST_ROOT", {}).get("value", install_sh_default(ctx, "HOST_ROOT"))
    with open(os.path.join(ctx.deploy, "Dockerfile")) as f:
        dockerfile = f.read()
    script = c["command"][0]
    ensure(re.search(r"^COPY install\.sh " + re.escape(script) + "$", dockerfile, re.M),
           f"the command {script} is not where deploy/Dockerfile puts install.sh")
    ensure(c["command"][1:] == ["run"], f"the DaemonSet runs install.sh {c['command'][1:]}, not `run`")
    payload = env.get("MOAT_DEPLOY_PAYLOAD", {}).get("value")
    ensure(payload and re.search(r"^COPY payload/ " + re.escape(payload) + "/?$", dockerfile, re.M),
           f"MOAT_DEPLOY_PAYLOAD {payload} is not where deploy/Dockerfile puts the payload")
    probe = c["readinessProbe"]["exec"]["command"]
    ready = install_sh_default(ctx, "MOAT_DEPLOY_READY_FILE")
    ensure(probe[-1] == ready, f"the readiness probe checks {probe[-1]}, install.sh creates {ready}")
    vols = {v["name"]: v for v in pod["volumes"]}
    mounted = {}
    for m in c["volumeMounts"]:
        ensure(m["name"] in vols, f"volumeMount {m['name']} has no volume")
        hp = vols[m["name"]].get("hostPath", {}).get("path")
        ensure(hp and m["mountPath"].rstrip("/") == host_root + hp.rstrip("/"),
               f"{m['name']}: host {hp} is mounted at {m['mountPath']}, not under HOST_ROOT {host_root}")
        mounted[hp] = m
    for need in ("/usr/local", "/etc/containerd", "/etc/moat"):
        ensure(need in mounted, f"the host's {need} (written by install.sh) is not mounted")
    rc = docs.get(("RuntimeClass", "moat"))
    ensure(rc, "no RuntimeClass moat")
    handler = install_sh_default(ctx, "MOAT_DEPLOY_RUNTIME_NAME")
    ensure(rc["handler"] == handler, f"RuntimeClass handler {rc['handler']} != install.sh's runtime name {handler}")
    label = install_sh_default(ctx, "MOAT_DEPLOY_NODE_LABEL")
    ensure(rc["scheduling"]["nodeSelector"] == {label: "true"},
           f"RuntimeClass nodeSelector {rc['scheduling']['nodeSelector']} != install.sh's label {label}=true")
    return f"{len(docs)} objects: names, namespace, RBAC, mounts under {host_root}, image layout, handler, label"


def parse_quantity_mi(q):
    m = re.fullmatch(r"(\d+)(Mi|Gi)", q)
    ensure(m, f"unexpected memory quantity {q}")
    return int(m.group(1)) * (1024 if m.group(2) == "Gi" else 1)


def t_overhead(ctx):
    (rc,) = ctx.docs("runtimeclass.yaml")
    overhead = rc["overhead"]["podFixed"]
    for doc in ("docs/operating.md", "docs/shim.md"):
        with open(os.path.join(ctx.repo, doc)) as f:
            blocks = re.findall(r"```yaml\n(.*?)```", f.read(), re.S)
        documented = []
        for b in blocks:
            try:
                y = yaml.safe_load(b)
            except yaml.YAMLError:
                continue  # an excerpt, not a manifest
            if isinstance(y, dict) and y.get("kind") == "RuntimeClass":
                documented.append(y)
        ensure(documented, f"{doc} has no RuntimeClass example")
        for d in documented:
            ensure(d["overhead"]["podFixed"] == overhead,
                   f"{doc} documents overhead {d['overhead']['podFixed']}, deploy/runtimeclass.yaml has {overhead}")
            ensure(d["handler"] == rc["handler"], f"{doc}: handler {d['handler']} != {rc['handler']}")
    with open(os.path.join(ctx.repo, "config/moat.toml"), "rb") as f:
        memory_mib = tomllib.load(f)["memory_mib"]
    mi = parse_quantity_mi(overhead["memory"])
    ensure(mi == memory_mib + 16, f"overhead memory {mi}Mi != memory_mib ({memory_mib}) + 16 (docs/operating.md)")
    return f"overhead {overhead} = docs/operating.md, docs/shim.md; memory = memory_mib {memory_mib} + 16"


def t_shellcheck(ctx):
    sc = os.path.join(ctx.venv, "bin", "shellcheck") if ctx.venv else shutil.which("shellcheck")
    if not sc or not os.access(sc, os.X_OK):
        raise Skipped("shellcheck not installed (tests/deploy/setup-tools failed)")
    files = ["deploy/install.sh", "deploy/build-payload", "tests/deploy/run", "tests/deploy/setup-tools"]
    run([sc, *files], cwd=ctx.repo)
    version = re.search(r"^version: (\S+)", run([sc, "--version"]).stdout, re.M)
    return f"shellcheck {version.group(1) if version else '?'} clean: {', '.join(files)}"


# ---- payload --------------------------------------------------------------------------------

def build_payload(ctx):
    missing = [b for b in BINS if not os.access(os.path.join(ctx.bin, b), os.X_OK)]
    if missing:
        raise Skipped(f"not built in {ctx.bin}: {', '.join(missing)}")
    guest = ctx.guest
    if not all(os.path.isfile(os.path.join(guest, g)) for g in GUEST):
        # Stand-ins: the trial installs the files, it boots nothing.
        guest = os.path.join(ctx.tmp, "guest-stand-ins")
        os.makedirs(guest, exist_ok=True)
        for g in GUEST:
            with open(os.path.join(guest, g), "wb") as f:
                f.write(f"stand-in {g} for tests/deploy\n".encode())
        ctx.payload_note = f" (guest files: stand-ins, {ctx.guest} has no {' '.join(GUEST)})"
    out = os.path.join(ctx.tmp, "context")
    run([os.path.join(ctx.deploy, "build-payload"), "--bin", ctx.bin, "--guest", guest, "--out", out])
    return os.path.join(out, "payload")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def t_build_payload(ctx):
    payload = ctx.need_payload()
    context = os.path.dirname(payload)
    expect = {f"bin/{b}": 0o755 for b in BINS}
    expect.update({f"share/moat/{g}": 0o644 for g in GUEST})
    expect["config/moat.toml"] = 0o644
    for rel, mode in expect.items():
        st = os.stat(os.path.join(payload, rel))
        ensure(stat.S_IMODE(st.st_mode) == mode, f"payload/{rel}: mode {oct(stat.S_IMODE(st.st_mode))}, want {oct(mode)}")
    for b in BINS:
        ensure(sha256(os.path.join(payload, "bin", b)) == sha256(os.path.join(ctx.bin, b)), f"payload/bin/{b} differs from {ctx.bin}")
    ensure(open(os.path.join(payload, "config/moat.toml")).read() == open(os.path.join(ctx.repo, "config/moat.toml")).read(),
           "payload/config/moat.toml differs from config/moat.toml")
    ensure(os.access(os.path.join(context, "install.sh"), os.X_OK), "the context has no executable install.sh")
    ensure(os.path.isfile(os.path.join(context, "Dockerfile")), "the context has no Dockerfile")
    version = open(os.path.join(payload, "VERSION")).read()
    for rel in expect:
        ensure(f"{sha256(os.path.join(payload, rel))}  {rel}" in version, f"VERSION has no checksum of {rel}")
    return f"{context}: {version.splitlines()[0]}{ctx.payload_note}"


def t_payload_incomplete(ctx):
    """install.sh refuses a payload that lacks a file, before touching the host."""
    d = os.path.join(ctx.tmp, "incomplete")
    host = os.path.join(d, "host")
    os.makedirs(os.path.join(d, "payload/bin"))
    os.makedirs(host)
    r = run([os.path.join(ctx.deploy, "install.sh"), "install"], check=False,
            env=install_env(host, os.path.join(d, "payload")))
    ensure(r.returncode == 1, f"install.sh with an empty payload: exit {r.returncode}, want 1")
    ensure("lacks bin/containerd-shim-moat-v2" in r.stderr, f"no error naming the missing file: {r.stderr.strip()}")
    ensure(os.listdir(host) == [], f"install.sh wrote into HOST_ROOT: {os.listdir(host)}")
    r = run([os.path.join(ctx.deploy, "install.sh"), "bogus"], check=False, env=install_env(host, d))
    ensure(r.returncode == 2, f"install.sh bogus: exit {r.returncode}, want 2")
    return "empty payload: exit 1 naming the file, HOST_ROOT untouched; unknown command: exit 2"


# ---- the E2E trial --------------------------------------------------------------------------

def containerds():
    return [("1.6", "/usr/bin/containerd"),
            ("2.4.2", "/usr/local/lib/moat-test/containerd2/containerd")]


_ISOLATE = None


def isolate():
    """`moat install` looks for a running containerd in /proc (its binary, whether it has read
    the file): the trial runs install.sh in a PID namespace of its own, where there is none,
    whatever runs on this machine. [] where that cannot be done (not root)."""
    global _ISOLATE
    if _ISOLATE is None:
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
        ok = shutil.which("unshare") and run(cmd + ["true"], check=False, timeout=30).returncode == 0
        _ISOLATE = cmd if ok else []
    return _ISOLATE


def install_env(host_root, payload, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KUBERNETES_", "MOAT_DEPLOY_")) and k not in ("NODE_NAME", "HOST_ROOT")}
    env.update(HOST_ROOT=host_root, MOAT_DEPLOY_PAYLOAD=payload, MOAT_DEPLOY_RESTART="0")
    env.update(extra)
    return env


def snapshot(root):
    """path -> (kind, mode, sha256 or link target, size, mtime_ns, inode) of everything under
    root."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                snap[rel] = ("link", 0, os.readlink(p), 0, 0, 0)
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir", stat.S_IMODE(st.st_mode), "", 0, 0, 0)
            else:
                snap[rel] = ("file", stat.S_IMODE(st.st_mode), sha256(p), st.st_size, st.st_mtime_ns, st.st_ino)
    return snap


def diff(a, b, fields=6):
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"+{k}")
        elif k not in b:
            out.append(f"-{k}")
        elif a[k][:fields] != b[k][:fields]:
            out.append(f"~{k}")
    return out


def make_host(ctx, label, containerd, changed_moat_config=None):
    host = tempfile.mkdtemp(prefix=f"host-{label}.", dir=ctx.tmp)
    for d in ("etc/containerd", "usr/local/bin", "usr/local/share"):
        os.makedirs(os.path.join(host, d))
    # Something of the host's own next to what moat-deploy installs.
    other = os.path.join(host, "usr/local/bin/other-tool")
    with open(other, "w") as f:
        f.write("#!/bin/sh\necho host tool\n")
    os.chmod(other, 0o755)
    cfg = os.path.join(host, "etc/containerd/config.toml")
    with open(cfg, "w") as f:
        f.write(run([containerd, "config", "default"]).stdout)
    if changed_moat_config is not None:
        os.makedirs(os.path.join(host, "etc/moat"))
        with open(os.path.join(host, "etc/moat/config.toml"), "w") as f:
            f.write(changed_moat_config)
    return host, cfg


def dump(containerd, cfg):
    return run([containerd, "--config", cfg, "config", "dump"]).stdout


def moat_runtime(dump_text):
    """The moat runtime's table in a `containerd config dump`, or None."""
    d = tomllib.loads(dump_text)
    plugins = d.get("plugins", {})
    for plugin in ("io.containerd.cri.v1.runtime", "io.containerd.grpc.v1.cri"):
        rt = plugins.get(plugin, {}).get("containerd", {}).get("runtimes", {}).get("moat")
        if rt is not None:
            return plugin, rt
    return None


def install_sh(ctx, cmd, env, timeout=300, check=True):
    r = run(isolate() + [os.path.join(ctx.deploy, "install.sh"), cmd], env=env, timeout=timeout, check=False)
    if not check:
        return r
    if r.returncode != 0:
        raise Failed(f"install.sh {cmd}: exit {r.returncode}: {(r.stderr + r.stdout).strip()[-1200:]}")
    return r.stdout


def check_installed(ctx, host, payload):
    for b in BINS:
        p = os.path.join(host, "usr/local/bin", b)
        st = os.lstat(p)
        ensure(stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755,
               f"{p}: mode {oct(st.st_mode)}, want a regular file 0755")
        ensure(sha256(p) == sha256(os.path.join(payload, "bin", b)), f"{p} differs from the payload")
    for g in GUEST:
        p = os.path.join(host, "usr/local/share/moat", g)
        st = os.lstat(p)
        ensure(stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644, f"{p}: mode {oct(st.st_mode)}, want 0644")
        ensure(sha256(p) == sha256(os.path.join(payload, "share/moat", g)), f"{p} differs from the payload")
    leftovers = [p for p in snapshot(host) if ".moat-deploy." in p]
    ensure(not leftovers, f"temporary files left: {leftovers}")


def t_trial(ctx, version, containerd):
    payload = ctx.need_trial()
    if not os.access(containerd, os.X_OK):
        raise Skipped(f"containerd {version} not installed at {containerd} (scripts/deps)")
    host, cfg = make_host(ctx, version, containerd)
    # `moat install` checks its edit with the containerd on PATH: this version's.
    env = install_env(host, payload, PATH=os.path.dirname(containerd) + os.pathsep + os.environ.get("PATH", ""))
    before = snapshot(host)
    dump_before = dump(containerd, cfg)
    ensure(moat_runtime(dump_before) is None, "the default configuration already has a moat runtime")

    install_sh(ctx, "install", env)
    check_installed(ctx, host, payload)
    moat_cfg = os.path.join(host, "etc/moat/config.toml")
    st = os.stat(moat_cfg)
    ensure(stat.S_IMODE(st.st_mode) == 0o644, f"{moat_cfg}: mode {oct(st.st_mode)}, want 0644")
    ensure(open(moat_cfg).read() == open(os.path.join(ctx.repo, "config/moat.toml")).read(),
           "etc/moat/config.toml is not config/moat.toml")
    found = moat_runtime(dump(containerd, cfg))
    ensure(found, f"`containerd --config {cfg} config dump` has no moat runtime after install")
    plugin, rt = found
    ensure(rt.get("runtime_type") == RUNTIME_TYPE, f"moat runtime_type {rt.get('runtime_type')!r}, want {RUNTIME_TYPE}")
    ensure(host not in json.dumps(rt), f"the runtime entry names a HOST_ROOT path (not the host's): {rt}")
    config_path = rt.get("options", {}).get("ConfigPath")
    first = snapshot(host)

    out = install_sh(ctx, "install", env)
    second = snapshot(host)
    changed = diff(first, second)
    ensure(not changed, f"a second install changed {changed}")
    ensure("installed /" not in out, f"a second install re-installed files: {out}")

    install_sh(ctx, "uninstall", env)
    after = snapshot(host)
    ensure(moat_runtime(dump(containerd, cfg)) is None, "the moat runtime is still in containerd's configuration")
    rel_cfg = os.path.relpath(cfg, host)
    # `moat install` may keep backups of containerd's configuration next to it.
    backups = [p for p in set(after) - set(before) if p.startswith(rel_cfg + ".") or
               (os.path.dirname(p) == os.path.dirname(rel_cfg) and "config.toml" in p)]
    extra = diff({k: v for k, v in before.items() if k != rel_cfg},
                 {k: v for k, v in after.items() if k != rel_cfg and k not in backups}, fields=3)
    ensure(not extra, f"uninstall did not restore the tree: {extra}")
    ensure(dump(containerd, cfg) == dump_before, "containerd's configuration after uninstall differs from before "
           "(config dump)")
    same_bytes = before[rel_cfg][2] == after[rel_cfg][2]
    again = snapshot(host)
    install_sh(ctx, "uninstall", env)
    ensure(not diff(again, snapshot(host)), "a second uninstall changed the tree")
    if not ctx.keep:
        shutil.rmtree(host)
    return (f"containerd {version} ({plugin}, ConfigPath {config_path}): files and modes, second run "
            f"unchanged, uninstall restores the tree (config {'byte-identical' if same_bytes else 'same dump'}"
            f"{', backups kept: ' + ', '.join(sorted(backups)) if backups else ''}){ctx.payload_note}")


def first_containerd():
    for version, path in containerds():
        if os.access(path, os.X_OK):
            return version, path
    raise Skipped("no containerd installed (scripts/deps)")


def t_kept_config(ctx):
    """A changed /etc/moat/config.toml stays as it is, through install and uninstall."""
    payload = ctx.need_trial()
    version, containerd = first_containerd()
    mine = open(os.path.join(ctx.repo, "config/moat.toml")).read().replace("memory_mib = 256", "memory_mib = 512")
    host, _ = make_host(ctx, "kept", containerd, changed_moat_config=mine)
    env = install_env(host, payload, PATH=os.path.dirname(containerd) + os.pathsep + os.environ.get("PATH", ""))
    out = install_sh(ctx, "install", env)
    path = os.path.join(host, "etc/moat/config.toml")
    ensure(open(path).read() == mine, "install changed an existing etc/moat/config.toml")
    ensure("kept" in out, "install did not say it kept the config")
    install_sh(ctx, "uninstall", env)
    ensure(open(path).read() == mine, "uninstall removed or changed a changed etc/moat/config.toml")
    ensure(not os.path.exists(os.path.join(host, "usr/local/bin/moat")), "uninstall left bin/moat")
    return f"containerd {version}: a changed config.toml kept by install and uninstall"


class FakeAPI(http.server.BaseHTTPRequestHandler):
    """Records PATCH /api/v1/nodes/NAME and answers like the API server (401 on a wrong token)."""
    calls = []
    token = ""

    def do_PATCH(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        FakeAPI.calls.append({"path": self.path, "auth": self.headers.get("Authorization"),
                              "type": self.headers.get("Content-Type"), "body": body})
        if self.headers.get("Authorization") != f"Bearer {FakeAPI.token}":
            self.send_response(401)
            payload = b'{"kind":"Status","status":"Failure","reason":"Unauthorized","code":401}'
        else:
            self.send_response(200)
            payload = b'{"kind":"Node","apiVersion":"v1"}'
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def t_run_mode(ctx):
    """`install.sh run` as the DaemonSet runs it: label through the API, restart through nsenter,
    readiness file; SIGTERM: unlabel, uninstall, restart, exit 0."""
    payload = ctx.need_trial()
    version, containerd = first_containerd()
    if not shutil.which("openssl") or not shutil.which("curl"):
        raise Skipped("openssl or curl not installed")
    host, _ = make_host(ctx, "run", containerd)
    d = tempfile.mkdtemp(prefix="pod.", dir=ctx.tmp)
    sa = os.path.join(d, "serviceaccount")
    os.makedirs(sa)
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", os.path.join(d, "key.pem"),
         "-out", os.path.join(sa, "ca.crt")])
    FakeAPI.token = "test-token-" + os.urandom(8).hex()
    FakeAPI.calls = []
    with open(os.path.join(sa, "token"), "w") as f:
        f.write(FakeAPI.token)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(os.path.join(sa, "ca.crt"), os.path.join(d, "key.pem"))
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # nsenter stand-in: records what it would run on the host.
    fakebin = os.path.join(d, "bin")
    os.makedirs(fakebin)
    nsenter_log = os.path.join(d, "nsenter.log")
    with open(os.path.join(fakebin, "nsenter"), "w") as f:
        f.write(f'#!/bin/sh\necho "$*" >>{nsenter_log}\n')
    os.chmod(os.path.join(fakebin, "nsenter"), 0o755)
    ready = os.path.join(d, "ready")
    env = install_env(host, payload, MOAT_DEPLOY_RESTART="1", MOAT_DEPLOY_READY_FILE=ready,
                      MOAT_DEPLOY_SA_DIR=sa, KUBERNETES_SERVICE_HOST="127.0.0.1",
                      KUBERNETES_SERVICE_PORT=str(server.server_address[1]), NODE_NAME="node-a",
                      PATH=os.pathsep.join([fakebin, os.path.dirname(containerd), os.environ.get("PATH", "/usr/bin:/bin")]))
    restart = "--target 1 --mount -- systemctl restart containerd"

    def nsenter_calls():
        return open(nsenter_log).read().splitlines() if os.path.exists(nsenter_log) else []

    log_path = os.path.join(d, "run.log")
    try:
        with open(log_path, "w") as log:
            p = subprocess.Popen(isolate() + [os.path.join(ctx.deploy, "install.sh"), "run"], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not os.path.exists(ready) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if not os.path.exists(ready):
            if p.poll() is None:
                p.kill()
            p.wait()
            raise Failed(f"install.sh run never became ready (exit {p.returncode}): {open(log_path).read()[-1200:]}")
        check_installed(ctx, host, payload)
        ensure(len(FakeAPI.calls) == 1, f"{len(FakeAPI.calls)} API calls after install, want 1")
        call = FakeAPI.calls[0]
        ensure(call["path"] == "/api/v1/nodes/node-a", f"PATCH {call['path']}")
        ensure(call["type"] == "application/merge-patch+json", f"Content-Type {call['type']}")
        ensure(call["auth"] == f"Bearer {FakeAPI.token}", "no service account token")
        ensure(json.loads(call["body"]) == {"metadata": {"labels": {LABEL: "true"}}}, f"label body {call['body']}")
        ensure(nsenter_calls() == [restart], f"containerd restarts after install: {nsenter_calls()}")
        ensure(FakeAPI.token not in open(log_path).read(), "the token is in the log")
        # The kubelet's SIGTERM goes to install.sh (under unshare: its child).
        target = p.pid
        if isolate():
            with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                target = int(f.read().split()[0])
        os.kill(target, signal.SIGTERM)
        try:
            rc = p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            raise Failed("install.sh run did not end after SIGTERM")
        ensure(rc == 0, f"install.sh run exited {rc} after SIGTERM: {open(log_path).read()[-1200:]}")
        ensure(len(FakeAPI.calls) == 2 and json.loads(FakeAPI.calls[1]["body"]) ==
               {"metadata": {"labels": {LABEL: None}}}, f"no label removal after SIGTERM: {FakeAPI.calls[1:]}")
        ensure(nsenter_calls() == [restart, restart], f"containerd restarts after uninstall: {nsenter_calls()}")
        ensure(not os.path.exists(ready), "the readiness file is still there")
        for b in BINS:
            ensure(not os.path.exists(os.path.join(host, "usr/local/bin", b)), f"bin/{b} left after SIGTERM")
        # Installed already: the second install neither restarts containerd nor fails; a wrong
        # token fails the install (the pod restarts and tries again).
        install_sh(ctx, "install", env)
        n = len(nsenter_calls())
        install_sh(ctx, "install", env)
        ensure(len(nsenter_calls()) == n, "a second install restarted containerd")
        with open(os.path.join(sa, "token"), "w") as f:
            f.write("wrong")
        r = install_sh(ctx, "install", env, check=False)
        ensure(r.returncode == 1 and "cannot set label" in r.stderr and "Unauthorized" in r.stderr,
               f"install with a wrong token: exit {r.returncode}: {r.stderr.strip()[-400:]}")
        # Uninstalling goes on without the label (the service account may be gone already).
        r = install_sh(ctx, "uninstall", env, check=False)
        ensure(r.returncode == 0 and not os.path.exists(os.path.join(host, "usr/local/bin/moat")),
               f"uninstall with a wrong token: exit {r.returncode}: {r.stderr.strip()[-400:]}")
    finally:
        server.shutdown()
    return (f"containerd {version}: label set and removed through the API (TLS, token), containerd "
            f"restarted on each change only, readiness file, SIGTERM uninstalls")


# ---- main -----------------------------------------------------------------------------------

def tests(ctx):
    t = []
    for name in ctx.manifests():
        for v in KUBE_VERSIONS:
            t.append((f"schema[{name}@{v}]", lambda n=name, v=v: t_schema(ctx, n, v)))
    for file, what, old, new in BROKEN:
        t.append((f"schema-rejects[{file}: {what}]", lambda a=(file, what, old, new): t_schema_rejects(ctx, *a)))
    t.append(("manifests-consistent", lambda: t_consistent(ctx)))
    t.append(("overhead-as-documented", lambda: t_overhead(ctx)))
    t.append(("shellcheck", lambda: t_shellcheck(ctx)))
    t.append(("build-payload", lambda: t_build_payload(ctx)))
    t.append(("install.sh-refuses-incomplete-payload", lambda: t_payload_incomplete(ctx)))
    for version, path in containerds():
        t.append((f"trial[containerd {version}]", lambda v=version, p=path: t_trial(ctx, v, p)))
    t.append(("trial[kept config]", lambda: t_kept_config(ctx)))
    t.append(("trial[run in a pod, SIGTERM]", lambda: t_run_mode(ctx)))
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "../.."))
    ap.add_argument("--moat-bin", required=True)
    ap.add_argument("--moat-guest", required=True)
    ap.add_argument("--venv", default="")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--filter", default="", help="run the tests whose name matches this regex")
    args = ap.parse_args()
    ctx = Ctx(args)
    passed = failed = skipped = 0
    try:
        for name, fn in tests(ctx):
            if args.filter and not re.search(args.filter, name):
                continue
            start = time.monotonic()
            try:
                what = fn()
                passed += 1
                print(f"test {name} ... ok ({time.monotonic() - start:.1f} s): {what}", flush=True)
            except Skipped as e:
                skipped += 1
                print(f"test {name} ... skipped: {e}", flush=True)
            except Failed as e:
                failed += 1
                print(f"test {name} ... FAILED: {e}", flush=True)
            except Exception as e:  # a test's own error is its failure, not the run's
                failed += 1
                print(f"test {name} ... FAILED: {type(e).__name__}: {e}", flush=True)
    finally:
        if args.keep:
            print(f"deploy: kept {ctx.tmp}", flush=True)
        else:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
    print(f"deploy: {passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
