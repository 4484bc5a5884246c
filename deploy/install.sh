#!/usr/bin/env bash
# deploy/install.sh: installs moat on the node this runs on, from the moat-deploy DaemonSet's
# image (deploy/moat-deploy.yaml), the way kata-deploy installs Kata Containers.
#
#   install.sh run        install, label the node, then wait; on SIGTERM (the pod is deleted)
#                         unlabel and uninstall, then exit (the DaemonSet's command)
#   install.sh install    install and label once, then exit
#   install.sh uninstall  unlabel and uninstall once, then exit
#
# install copies, from the payload (deploy/build-payload; in the image /opt/moat-deploy/payload),
#   bin/{containerd-shim-moat-v2,moat-vmm,moat}  to HOST_ROOT/usr/local/bin/      (0755)
#   share/moat/{vmlinux,initramfs.cpio}          to HOST_ROOT/usr/local/share/moat/ (0644)
#   config/moat.toml                             to HOST_ROOT/etc/moat/config.toml (0644), only
#                                                when no file is there
# each written next to its target and renamed over it (a starting pod never sees half a file),
# and only when it differs; then it runs the payload's
#   moat install --containerd-config HOST_ROOT/etc/containerd/config.toml --runtime-name moat
# with --restart, so containerd is restarted on the host when moat changed the file or the
# running containerd has not read it yet (systemctl reached through PID 1's mount namespace:
# the pod has hostPID). Last, in a pod (KUBERNETES_SERVICE_HOST set), it labels its node
# moat.io/runtime=true through the Kubernetes API with the pod's service account token; the
# RuntimeClass `moat` (deploy/runtimeclass.yaml) schedules pods on nodes with that label only.
#
# uninstall undoes that in reverse order: removes the label, runs `moat install --uninstall
# --restart`, removes the five files, the config only if it is still the shipped one, and
# share/moat and etc/moat if they are left empty.
# A second install or uninstall changes nothing.
#
# Environment (the DaemonSet sets the first two):
#   HOST_ROOT                       where the host's / is mounted (default /host)
#   NODE_NAME                       this node's name (downward API), needed for the label
#   MOAT_DEPLOY_PAYLOAD             the payload directory (default: payload/ next to this script)
#   MOAT_DEPLOY_CONTAINERD_CONFIG   containerd's configuration, a host path
#                                   (default /etc/containerd/config.toml)
#   MOAT_DEPLOY_RUNTIME_NAME        the CRI runtime name = RuntimeClass handler (default moat)
#   MOAT_DEPLOY_RESTART             1: restart containerd when it has not read its configuration
#                                   as it now is (default); 0: never (tests; restart it yourself)
#   MOAT_DEPLOY_NODE_LABEL          the node label set to "true" (default moat.io/runtime)
#   MOAT_DEPLOY_UNINSTALL_ON_STOP   1: `run` uninstalls on SIGTERM (default); 0: it leaves moat
#                                   installed (e.g. to update the DaemonSet without a gap)
#   MOAT_DEPLOY_READY_FILE          `run` creates it once installed (the pod's readiness probe;
#                                   default /tmp/moat-deploy.ready) and removes it on SIGTERM
#   MOAT_DEPLOY_SA_DIR              the service account's token and CA
#                                   (default /var/run/secrets/kubernetes.io/serviceaccount)
# Exits 0 on success, 1 on a failed step (the pod then restarts and tries again), 2 on usage.
set -euo pipefail

say() { echo "moat-deploy: $*"; }
die() {
	echo "moat-deploy: error: $*" >&2
	exit 1
}

host_root=${HOST_ROOT:-/host}
host_root=${host_root%/}
payload=${MOAT_DEPLOY_PAYLOAD:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/payload}
containerd_config=${MOAT_DEPLOY_CONTAINERD_CONFIG:-/etc/containerd/config.toml}
runtime_name=${MOAT_DEPLOY_RUNTIME_NAME:-moat}
restart=${MOAT_DEPLOY_RESTART:-1}
node_label=${MOAT_DEPLOY_NODE_LABEL:-moat.io/runtime}
uninstall_on_stop=${MOAT_DEPLOY_UNINSTALL_ON_STOP:-1}
ready_file=${MOAT_DEPLOY_READY_FILE:-/tmp/moat-deploy.ready}
sa_dir=${MOAT_DEPLOY_SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}

# The installed layout: the prefix of scripts/install and of the shim's built-in defaults
# (shim/src/config.rs, config/moat.toml). /usr/local/bin is on containerd's PATH, where it looks
# for containerd-shim-moat-v2.
prefix=/usr/local
bins=(containerd-shim-moat-v2 moat-vmm moat)
guest=(vmlinux initramfs.cpio)
bin_dir=$host_root$prefix/bin
guest_dir=$host_root$prefix/share/moat
config_dir=$host_root/etc/moat
containerd_file=$host_root$containerd_config

check_payload() {
	local missing=() f
	for f in "${bins[@]}"; do [[ -x $payload/bin/$f ]] || missing+=("bin/$f"); done
	for f in "${guest[@]}"; do [[ -f $payload/share/moat/$f ]] || missing+=("share/moat/$f"); done
	[[ -f $payload/config/moat.toml ]] || missing+=("config/moat.toml")
	[[ ${#missing[@]} -eq 0 ]] || die "payload $payload lacks ${missing[*]} (see deploy/build-payload)"
	[[ -d $host_root ]] || die "HOST_ROOT $host_root is not a directory (mount the host's directories there)"
	if [[ -f $payload/VERSION ]]; then
		say "payload: $(head -n 1 "$payload/VERSION")"
	fi
}

# put SRC DEST MODE: copies SRC next to DEST and renames it over DEST, unless DEST already has
# SRC's contents and MODE.
put() {
	local src=$1 dest=$2 mode=$3 tmp
	if [[ -f $dest && ! -L $dest ]] && [[ $(stat -c %a "$dest") == "${mode#0}" ]] && cmp -s "$src" "$dest"; then
		say "unchanged $dest"
		return
	fi
	tmp="$(dirname "$dest")/.$(basename "$dest").moat-deploy.$$"
	cp "$src" "$tmp"
	chmod "$mode" "$tmp"
	mv -f "$tmp" "$dest"
	say "installed $dest"
}

# containerd_step [--uninstall]: runs the payload's `moat install` on containerd's configuration.
# With MOAT_DEPLOY_RESTART=1 it passes --restart: moat then runs `systemctl restart containerd`
# when it changed the file or when the running containerd (seen in /proc: hostPID) started before
# the file's last change. systemctl here is a stand-in first on PATH that runs the host's
# through PID 1's mount namespace, as kata-deploy does; the image has no systemd.
containerd_step() {
	if [[ ${1:-} == --uninstall && ! -e $containerd_file ]]; then
		say "no $containerd_file: nothing to remove from containerd's configuration"
		return 0
	fi
	local args=(install --containerd-config "$containerd_file" --runtime-name "$runtime_name" "$@")
	local path=$PATH wrappers=""
	if [[ $restart != 0 ]]; then
		args+=(--restart)
		wrappers=$(mktemp -d)
		# shellcheck disable=SC2016 # $@ belongs to the wrapper
		printf '#!/bin/sh\nexec nsenter --target 1 --mount -- systemctl "$@"\n' >"$wrappers/systemctl"
		chmod 0755 "$wrappers/systemctl"
		path=$wrappers:$PATH
	else
		say "MOAT_DEPLOY_RESTART=0: containerd is not restarted (restart it to load a change)"
	fi
	say "moat ${args[*]}"
	local rc=0
	PATH=$path "$payload/bin/moat" "${args[@]}" 2>&1 | sed 's/^/moat-deploy: moat: /' || rc=$?
	[[ -z $wrappers ]] || rm -rf "$wrappers"
	[[ $rc == 0 ]] || die "moat ${args[*]} failed"
}

# label_node true|null: sets or removes the node label through the API server (no kubectl in
# the image: curl, the service account's token and CA). Outside a pod it does nothing.
label_node() {
	local value=$1 host port body value_json response
	if [[ -z ${KUBERNETES_SERVICE_HOST:-} ]]; then
		say "not in a Kubernetes pod (no KUBERNETES_SERVICE_HOST): node not labelled"
		return 0
	fi
	[[ -n ${NODE_NAME:-} ]] || { echo "moat-deploy: error: NODE_NAME is not set (the DaemonSet sets it from spec.nodeName)" >&2; return 1; }
	[[ -r $sa_dir/token && -r $sa_dir/ca.crt ]] || { echo "moat-deploy: error: no service account token in $sa_dir" >&2; return 1; }
	host=$KUBERNETES_SERVICE_HOST
	[[ $host == *:* ]] && host="[$host]"
	port=${KUBERNETES_SERVICE_PORT:-443}
	if [[ $value == null ]]; then value_json=null; else value_json="\"$value\""; fi
	body="{\"metadata\":{\"labels\":{\"$node_label\":$value_json}}}"
	# The token goes in a header read from a file descriptor: with hostPID, command lines are
	# visible on the host.
	response=$(mktemp)
	if ! curl --silent --show-error --fail-with-body --max-time 30 --retry 5 --retry-connrefused \
		--cacert "$sa_dir/ca.crt" -H @<(printf 'Authorization: Bearer %s\n' "$(cat "$sa_dir/token")") \
		-X PATCH -H 'Content-Type: application/merge-patch+json' --data-binary "$body" \
		-o "$response" "https://$host:$port/api/v1/nodes/$NODE_NAME"; then
		echo "moat-deploy: error: cannot set label $node_label=$value on node $NODE_NAME: $(head -c 600 "$response")" >&2
		rm -f "$response"
		return 1
	fi
	rm -f "$response"
	if [[ $value == null ]]; then
		say "node $NODE_NAME: removed label $node_label"
	else
		say "node $NODE_NAME: labelled $node_label=$value"
	fi
}

do_install() {
	check_payload
	local b g
	mkdir -p "$bin_dir" "$guest_dir" "$config_dir"
	for b in "${bins[@]}"; do put "$payload/bin/$b" "$bin_dir/$b" 0755; done
	for g in "${guest[@]}"; do put "$payload/share/moat/$g" "$guest_dir/$g" 0644; done
	if [[ -e $config_dir/config.toml ]]; then
		say "kept $config_dir/config.toml (exists)"
	else
		put "$payload/config/moat.toml" "$config_dir/config.toml" 0644
	fi
	containerd_step
	label_node true || exit 1
	say "installed"
}

do_uninstall() {
	check_payload
	local b g
	# The label first, so that no new moat pod is scheduled here while the runtime goes.
	label_node null || say "warning: the label stays; remove it with kubectl label node ${NODE_NAME:-NODE} $node_label-"
	containerd_step --uninstall
	for b in "${bins[@]}"; do rm -fv "$bin_dir/$b" | sed 's/^/moat-deploy: /'; done
	for g in "${guest[@]}"; do rm -fv "$guest_dir/$g" | sed 's/^/moat-deploy: /'; done
	rmdir "$guest_dir" 2>/dev/null || true
	if [[ -f $config_dir/config.toml ]]; then
		if cmp -s "$config_dir/config.toml" "$payload/config/moat.toml"; then
			rm -v "$config_dir/config.toml" | sed 's/^/moat-deploy: /'
		else
			say "kept $config_dir/config.toml (changed from the shipped one)"
		fi
	fi
	# A mount point (the DaemonSet's hostPath) is not removed: rmdir fails, which is fine.
	rmdir "$config_dir" 2>/dev/null || true
	say "uninstalled"
}

sleeper=""
on_stop() {
	trap - TERM INT
	[[ -z $sleeper ]] || kill "$sleeper" 2>/dev/null || true
	rm -f "$ready_file"
	if [[ $uninstall_on_stop == 0 ]]; then
		say "stopping; MOAT_DEPLOY_UNINSTALL_ON_STOP=0: moat stays installed"
	else
		say "stopping: uninstalling"
		do_uninstall
	fi
	exit 0
}

case "${1:-}" in
run)
	# Set first: a SIGTERM during the install uninstalls once the current step is done.
	trap on_stop TERM INT
	do_install
	: >"$ready_file"
	say "waiting (SIGTERM uninstalls)"
	sleep infinity &
	sleeper=$!
	wait "$sleeper" || true
	;;
install) do_install ;;
uninstall) do_uninstall ;;
-h | --help)
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
	;;
*)
	echo "usage: install.sh run|install|uninstall (see --help)" >&2
	exit 2
	;;
esac
