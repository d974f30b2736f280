#!/usr/bin/env bash
# .ci/testbed.sh -- bring up arservice's local test bed on a Debian 12 machine.
#
# Idempotent: on a clean machine it installs packages, starts the daemons,
# builds the test images and the bubblewrap rootfs; when re-run it only checks
# that everything is there and answers, and (re)starts what is not running.
# Must run as root. Needs no container registry: images are built from the
# host's busybox-static and bash.
#
# What it provides (fixed names, nothing is exported to the caller):
#   docker images   arservice-test/busybox:latest  (busybox applets only, no bash)
#                   arservice-test/bash:latest     (the same plus /bin/bash + its libs)
#   podman          rootful, the same two images in its own store (`docker save | podman load`
#                   names them localhost/arservice-test/...; the short names find them)
#   rootless podman user arservice-rootless (subordinate ids, XDG_RUNTIME_DIR /run/user/UID,
#                   containers without a network: /dev/net/tun is root's alone here), the
#                   busybox image in its own store
#   rootfs dirs     /var/lib/arservice-testbed/rootfs-bash     (same content as the bash image)
#                   /var/lib/arservice-testbed/rootfs-busybox  (same content as the busybox image)
#   slurm           one node "$(hostname -s)", partition "debug" (default, OverSubscribe=FORCE:64)
#   slurm-multi     a second cluster beside it (SLURM_CONF=/etc/slurm-multi/slurm.conf): its own
#                   slurmctld (port 6819) and two nodes n1, n2, each its own slurmd on this host
#                   (ports 6831, 6832), partition "multi" (least loaded node first)
#
# Environment:
#   TESTBED_SKIP_DOCKER=1    skip the docker engine and the docker images
#   TESTBED_SKIP_SLURM=1     skip munge and slurm (both clusters)
#   TESTBED_SKIP_PODMAN=1    skip podman's configuration and images (rootful and rootless)
#   TESTBED_EXTRA_PACKAGES   more Debian packages to make sure are installed (space separated)
#   TESTBED_TIMEOUT=60       seconds to wait for each daemon to answer
#
# Logs: /var/log/dockerd.log, /var/log/munge/munged.log, /var/log/slurm/slurm{ctld,d}.log,
#       /var/log/slurm/slurmctld-multi.log, /var/log/slurm/slurmd-multi-{n1,n2}.log
# Exit status: 0 when every component that was not skipped is ok, 1 otherwise.

set -Euo pipefail
shopt -s inherit_errexit 2>/dev/null || true
export LC_ALL=C
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

readonly STATE_DIR=/var/lib/arservice-testbed
readonly ROOTFS_BASH="$STATE_DIR/rootfs-bash"
readonly ROOTFS_BUSYBOX="$STATE_DIR/rootfs-busybox"
readonly IMAGE_BUSYBOX=arservice-test/busybox:latest
readonly IMAGE_BASH=arservice-test/bash:latest
readonly RECIPE_LABEL=org.arservice.testbed.recipe
readonly SLURM_CONF_FILE=/etc/slurm/slurm.conf
readonly SLURM_PARTITION=debug
readonly DOCKERD_LOG=/var/log/dockerd.log
# catatonit: podman's `--init` binary (its init_path); Debian's podman only recommends it.
# curl: the documentation's examples (tests/docs.rs runs them).
readonly PACKAGES=(docker.io bubblewrap busybox-static munge slurm-wlm debootstrap python3-venv
	podman catatonit curl)
readonly TIMEOUT="${TESTBED_TIMEOUT:-60}"
# Debian's own client always speaks the API of Debian's engine (20.10, API 1.41);
# a newer client earlier in PATH (/usr/local/bin/docker) is checked separately.
readonly DOCKER=/usr/bin/docker
readonly IMAGE_PATH_ENV="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

T0=${EPOCHREALTIME:-0}
COMP=main
RESULTS=""

log() { printf 'testbed: [%6.1fs] %-8s %s\n' "$(elapsed)" "$COMP" "$*" >&2; }
elapsed() { awk -v a="$T0" -v b="${EPOCHREALTIME:-0}" 'BEGIN { printf "%.1f", b - a }'; }
# Give up on the current component (components run in subshells).
fail() {
	printf '%s\n' "$*" >"$RESULTS/$COMP.err"
	log "FAILED: $*"
	exit 1
}
ok() { printf '%s\n' "$*" >"$RESULTS/$COMP.ok"; }
have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
# pid_alive PIDFILE NAME: the pid file names a live process called NAME.
pid_alive() {
	local pid
	pid=$(cat "$1" 2>/dev/null) || return 1
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	[ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.5 s until it succeeds.
wait_for() {
	local deadline=$((SECONDS + $1)) what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		if [ "$SECONDS" -ge "$deadline" ]; then
			log "gave up waiting for $what"
			return 1
		fi
		sleep 0.5
	done
}
# Run a daemon fully detached from this script: own session, no inherited
# stdio (a CI step would otherwise wait for the pipe to close) and not the lock fd.
spawn() {
	local logfile=$1
	shift
	setsid nohup "$@" </dev/null >>"$logfile" 2>&1 9>&- &
}

# ---------------------------------------------------------------- packages
comp_packages() {
	local -a want missing=()
	read -r -a want <<<"${PACKAGES[*]} ${TESTBED_EXTRA_PACKAGES:-}"
	local p
	for p in "${want[@]}"; do
		pkg_installed "$p" || missing+=("$p")
	done
	if [ "${#missing[@]}" -eq 0 ]; then
		ok "ok (all ${#want[@]} installed)"
		return 0
	fi
	log "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
	local -a apt_opts=(-q -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
		-o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300)
	apt-get "${apt_opts[@]}" update </dev/null || fail "apt-get update failed"
	apt-get "${apt_opts[@]}" install "${missing[@]}" </dev/null ||
		fail "apt-get install ${missing[*]} failed"
	for p in "${missing[@]}"; do
		pkg_installed "$p" || fail "package $p still not installed after apt-get install"
	done
	ok "ok (installed ${missing[*]})"
}

# ---------------------------------------------------------------- python tools
# The test tools, pinned, from PyPI. Debian's python3 is "externally managed" (PEP 668): they
# live in a venv of their own, and its programs are linked into /usr/local/bin.
#   schemathesis      tests/schemathesis.rs runs it against the live server
#   mini-swe-agent    tests/real_client.rs runs its DefaultAgent with the venv's python
#   openai, anthropic the official model SDKs, which tests/gateway.rs drives against the gateway
#                     (openai is mini-swe-agent's too: pinned at the version that resolves to)
#   arservice-client  clients/python of this checkout (tests/real_client.rs puts the checkout it
#                     runs from first on PYTHONPATH; this copy serves runs by hand)
readonly SCHEMATHESIS_VERSION=4.32.5
readonly MINI_SWE_AGENT_VERSION=2.4.6
readonly OPENAI_VERSION=3.57.0 ANTHROPIC_VERSION=2.10.0
readonly VENV=/var/lib/arservice-testbed/venv
CLIENT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../clients/python" 2>/dev/null && pwd) || CLIENT_DIR=""
readonly CLIENT_DIR
readonly CLIENT_RECIPE="$VENV/.arservice-client.recipe"

# venv_version DIST: the version of DIST installed in the venv, or nothing.
venv_version() {
	"$VENV/bin/python" - "$1" 2>/dev/null <<-'EOF'
		import importlib.metadata as metadata, sys
		try:
		    print(metadata.version(sys.argv[1]))
		except metadata.PackageNotFoundError:
		    pass
	EOF
}
# Everything the client package is made of (not what a build or an import leaves in it).
client_hash() {
	(cd "$CLIENT_DIR" && find . \( -name __pycache__ -o -name '*.egg-info' -o -name build \) -prune -o -type f -print |
		LC_ALL=C sort | xargs -d '\n' sha256sum) | sha256sum | cut -c1-16
}

comp_python() {
	[ -x /usr/bin/python3 ] || fail "python3 missing"
	[ -n "$CLIENT_DIR" ] && [ -f "$CLIENT_DIR/pyproject.toml" ] || fail "no clients/python/pyproject.toml beside .ci/"
	if [ ! -x "$VENV/bin/python" ]; then
		log "creating the test venv $VENV"
		/usr/bin/python3 -m venv "$VENV" </dev/null || fail "python3 -m venv $VENV failed"
	fi
	local -a pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check) installed=()
	if [ "$(venv_version schemathesis)" != "$SCHEMATHESIS_VERSION" ] ||
		[ "$(venv_version mini-swe-agent)" != "$MINI_SWE_AGENT_VERSION" ]; then
		# Both pins in one resolve: they share dependencies, and one alone may move the other's.
		log "installing schemathesis==$SCHEMATHESIS_VERSION mini-swe-agent==$MINI_SWE_AGENT_VERSION into $VENV (a few minutes the first time)"
		"${pip[@]}" "schemathesis==$SCHEMATHESIS_VERSION" "mini-swe-agent==$MINI_SWE_AGENT_VERSION" </dev/null ||
			fail "pip install schemathesis==$SCHEMATHESIS_VERSION mini-swe-agent==$MINI_SWE_AGENT_VERSION failed"
		installed+=(schemathesis mini-swe-agent)
	fi
	if [ "$(venv_version openai)" != "$OPENAI_VERSION" ] || [ "$(venv_version anthropic)" != "$ANTHROPIC_VERSION" ]; then
		log "installing openai==$OPENAI_VERSION anthropic==$ANTHROPIC_VERSION into $VENV"
		"${pip[@]}" "openai==$OPENAI_VERSION" "anthropic==$ANTHROPIC_VERSION" </dev/null ||
			fail "pip install openai==$OPENAI_VERSION anthropic==$ANTHROPIC_VERSION failed"
		installed+=(openai anthropic)
	fi
	local recipe
	recipe=$(client_hash)
	if [ "$(cat "$CLIENT_RECIPE" 2>/dev/null)" != "$recipe" ] || [ -z "$(venv_version arservice-client)" ]; then
		log "installing arservice-client from $CLIENT_DIR"
		"${pip[@]}" --no-deps --force-reinstall "$CLIENT_DIR" </dev/null || fail "pip install $CLIENT_DIR failed"
		echo "$recipe" >"$CLIENT_RECIPE"
		installed+=(arservice-client)
	fi
	ln -sf "$VENV/bin/st" /usr/local/bin/st
	hash -r
	local have
	have=$(st --version 2>/dev/null | awk '{print $NF}') || have=""
	[ "$have" = "$SCHEMATHESIS_VERSION" ] || fail "st --version says '$have', not $SCHEMATHESIS_VERSION"
	# From / so that the installed copy is imported, not a checkout in the working directory.
	have=$(cd / && MSWEA_SILENT_STARTUP=1 "$VENV/bin/python" -c \
		'import minisweagent, arservice.minisweagent; print(minisweagent.__version__)' 2>&1) ||
		fail "the venv cannot import minisweagent and arservice.minisweagent: $have"
	[ "$have" = "$MINI_SWE_AGENT_VERSION" ] || fail "mini-swe-agent is '$have', not $MINI_SWE_AGENT_VERSION"
	ok "ok (schemathesis $SCHEMATHESIS_VERSION, mini-swe-agent $MINI_SWE_AGENT_VERSION, arservice-client $(venv_version arservice-client)${installed:+; installed ${installed[*]}})"
}

# ---------------------------------------------------------------- rootfs
# build_rootfs DIR WITH_BASH(0|1): a minimal root filesystem from busybox-static
# (every applet symlinked at its usual path) and optionally bash with its libraries.
build_rootfs() {
	local d=$1 with_bash=$2 p lib
	mkdir -p "$d"
	(cd "$d" && mkdir -p bin sbin usr/bin usr/sbin usr/local/bin etc root home \
		tmp var/tmp run proc sys dev mnt opt)
	chmod 1777 "$d/tmp" "$d/var/tmp"
	chmod 0700 "$d/root"
	install -m 0755 /bin/busybox "$d/bin/busybox"
	while read -r p; do
		[ -n "$p" ] || continue
		[ -e "$d/$p" ] || [ -L "$d/$p" ] || ln -s /bin/busybox "$d/$p"
	done < <(/bin/busybox --list-full)
	local shell=/bin/sh
	if [ "$with_bash" = 1 ]; then
		shell=/bin/bash
		rm -f "$d/bin/bash"
		install -m 0755 /bin/bash "$d/bin/bash"
		# "libx.so => /path (addr)" lines and the loader line "/lib64/ld-...so.2 (addr)"
		while read -r lib; do
			mkdir -p "$d$(dirname "$lib")"
			cp -L "$lib" "$d$lib"
		done < <(ldd /bin/bash | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
		if [ ! -x "$d/bin/bash" ] || [ -z "$(ls "$d"/lib64/ld-linux-*.so.* 2>/dev/null)" ]; then
			fail "bash or its dynamic loader missing in $d"
		fi
	fi
	cat >"$d/etc/passwd" <<-EOF
		root:x:0:0:root:/root:$shell
		nobody:x:65534:65534:nobody:/nonexistent:/bin/false
	EOF
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$d/etc/group"
	printf 'export %s\n' "$IMAGE_PATH_ENV" >"$d/etc/profile"
	printf 'hosts: files dns\npasswd: files\ngroup: files\n' >"$d/etc/nsswitch.conf"
	printf '127.0.0.1 localhost\n::1 localhost\n' >"$d/etc/hosts"
	: >"$d/etc/resolv.conf"
	echo arservice-test >"$d/etc/hostname"
}

# import_image DIR NAME CMD HASH
import_image() {
	tar -C "$1" --numeric-owner -c . |
		"$DOCKER" import -c "ENV $IMAGE_PATH_ENV" -c "CMD [\"$3\"]" -c "LABEL $RECIPE_LABEL=$4" - "$2" >/dev/null
}

# Everything the rootfs and images are made of; a change rebuilds them.
recipe_hash() {
	{
		declare -f build_rootfs import_image
		echo "$IMAGE_PATH_ENV"
		dpkg-query -W -f='${Package}=${Version}\n' busybox-static bash libc6 libtinfo6 2>/dev/null
		sha256sum /bin/busybox /bin/bash
	} | sha256sum | cut -c1-16
}

# ensure_rootfs DIR WITH_BASH HASH: (re)build DIR atomically if its stamp differs.
ensure_rootfs() {
	local d=$1 with_bash=$2 hash=$3
	if [ -d "$d" ] && [ "$(cat "$d.recipe" 2>/dev/null)" = "$hash" ]; then
		return 0
	fi
	log "building $d"
	local new="$d.new.$$" old="$d.old.$$"
	rm -rf "$new"
	build_rootfs "$new" "$with_bash"
	[ -e "$d" ] && mv "$d" "$old"
	mv "$new" "$d"
	rm -rf "$old"
	echo "$hash" >"$d.recipe"
}

comp_rootfs() {
	/bin/busybox true || fail "/bin/busybox missing (package busybox-static)"
	[ -x /bin/bash ] || fail "/bin/bash missing"
	mkdir -p "$STATE_DIR"
	local hash
	hash=$(recipe_hash)
	ensure_rootfs "$ROOTFS_BUSYBOX" 0 "$hash"
	ensure_rootfs "$ROOTFS_BASH" 1 "$hash"
	# The bash rootfs must run bash with nothing from the host.
	# shellcheck disable=SC2016 # expanded by the inner bash
	chroot "$ROOTFS_BASH" /bin/bash -c 'test -n "$BASH_VERSION" && ls / >/dev/null' ||
		fail "bash does not run inside $ROOTFS_BASH"
	ok "ok ($ROOTFS_BASH, $ROOTFS_BUSYBOX, recipe $hash)"
}

# ---------------------------------------------------------------- bwrap
comp_bwrap() {
	have bwrap || fail "bwrap not installed (package bubblewrap)"
	[ -x "$ROOTFS_BASH/bin/bash" ] || fail "rootfs $ROOTFS_BASH missing"
	local out
	out=$(bwrap --ro-bind "$ROOTFS_BASH" / --proc /proc --dev /dev --tmpfs /tmp \
		--unshare-all --die-with-parent -- /bin/bash -c 'echo ok' 2>&1) ||
		fail "bwrap in $ROOTFS_BASH failed: $out"
	[ "$out" = ok ] || fail "bwrap in $ROOTFS_BASH printed '$out' instead of 'ok'"
	ok "ok ($(bwrap --version 2>/dev/null | head -n1))"
}

# ---------------------------------------------------------------- docker engine
docker_up() { "$DOCKER" info >/dev/null 2>&1; }

comp_docker() {
	[ -x "$DOCKER" ] || fail "$DOCKER missing (package docker.io)"
	have dockerd || fail "dockerd missing (package docker.io)"
	if ! docker_up; then
		if pid_alive /var/run/docker.pid dockerd; then
			log "dockerd (pid $(cat /var/run/docker.pid)) is starting, waiting"
		else
			log "starting dockerd (log $DOCKERD_LOG)"
			[ -f "$DOCKERD_LOG" ] && mv -f "$DOCKERD_LOG" "$DOCKERD_LOG.1"
			spawn "$DOCKERD_LOG" dockerd
		fi
		if ! wait_for "$TIMEOUT" "docker info" docker_up; then
			tail -n 30 "$DOCKERD_LOG" >&2 2>/dev/null || true
			fail "docker engine did not answer within ${TIMEOUT}s (see $DOCKERD_LOG)"
		fi
	fi
	local engine
	engine=$("$DOCKER" version --format '{{.Server.Version}}' 2>/dev/null) || engine=unknown
	# The docker the tests find in PATH may be a newer client (e.g. /usr/local/bin/docker).
	local path_docker note=""
	path_docker=$(command -v docker) || fail "no docker in PATH"
	if [ "$path_docker" != "$DOCKER" ]; then
		local out
		if ! out=$(docker version --format '{{.Client.Version}}/{{.Client.APIVersion}}' 2>&1); then
			fail "$path_docker cannot talk to engine $engine: $out (set DOCKER_API_VERSION or put /usr/bin first in PATH)"
		fi
		note=", PATH client $path_docker $out"
	fi
	ok "ok (engine $engine$note)"
}

# ---------------------------------------------------------------- docker images
# ensure_image NAME DIR CMD HASH
ensure_image() {
	local name=$1 dir=$2 cmd=$3 hash=$4 have_hash old_id=""
	have_hash=$("$DOCKER" image inspect -f "{{index .Config.Labels \"$RECIPE_LABEL\"}}" "$name" 2>/dev/null) || have_hash=""
	[ "$have_hash" = "$hash" ] && return 0
	old_id=$("$DOCKER" image inspect -f '{{.Id}}' "$name" 2>/dev/null) || old_id=""
	log "importing $name from $dir"
	import_image "$dir" "$name" "$cmd" "$hash" || fail "docker import of $name failed"
	# Drop the superseded image unless a container still uses it.
	[ -z "$old_id" ] || "$DOCKER" image rm "$old_id" >/dev/null 2>&1 || true
}

comp_images() {
	docker_up || fail "docker engine not running"
	local hash
	hash=$(cat "$ROOTFS_BASH.recipe" 2>/dev/null) || fail "rootfs not built"
	[ "$(cat "$ROOTFS_BUSYBOX.recipe" 2>/dev/null)" = "$hash" ] || fail "rootfs-busybox not built"
	ensure_image "$IMAGE_BUSYBOX" "$ROOTFS_BUSYBOX" /bin/sh "$hash"
	ensure_image "$IMAGE_BASH" "$ROOTFS_BASH" /bin/bash "$hash"
	local out
	out=$(docker run --rm --init "$IMAGE_BUSYBOX" sh -c 'echo hi; command -v bash || true' 2>&1) ||
		fail "docker run $IMAGE_BUSYBOX failed: $out"
	[ "$out" = hi ] || fail "docker run $IMAGE_BUSYBOX printed '$out' instead of 'hi'"
	out=$(docker run --rm --init "$IMAGE_BASH" bash -lc 'echo "$BASH_VERSION"' 2>&1) ||
		fail "docker run $IMAGE_BASH failed: $out"
	[[ "$out" =~ ^[0-9]+\.[0-9]+ ]] || fail "docker run $IMAGE_BASH printed '$out' instead of a bash version"
	ok "ok ($IMAGE_BUSYBOX, $IMAGE_BASH with bash $out)"
}

# ---------------------------------------------------------------- podman
# Podman 4.3's default ulimits exceed this machine's hard limits: its first `podman run` fails
# with "error setting rlimit type 7: operation not permitted". A drop-in (not the machine's own
# containers.conf) empties them.
readonly PODMAN_CONF=/etc/containers/containers.conf.d/50-arservice-testbed.conf

podman_conf() {
	cat <<-'EOF'
		# Written by arservice .ci/testbed.sh. Rewritten when it differs.
		# podman's default ulimits exceed this machine's hard limits (rlimit type 7).
		[containers]
		default_ulimits = []
	EOF
}

# ensure_podman_image NAME HASH: the docker image NAME in podman's store, loaded again when
# its recipe label differs. `podman load` names it localhost/NAME.
ensure_podman_image() {
	local name=$1 hash=$2 have_hash old_id=""
	have_hash=$(podman image inspect -f "{{index .Config.Labels \"$RECIPE_LABEL\"}}" "localhost/$name" 2>/dev/null) || have_hash=""
	[ "$have_hash" = "$hash" ] && return 0
	old_id=$(podman image inspect -f '{{.Id}}' "localhost/$name" 2>/dev/null) || old_id=""
	log "loading $name into podman's store"
	"$DOCKER" save "$name" | podman load -q >/dev/null || fail "docker save $name | podman load failed"
	[ -z "$old_id" ] || podman image rm "$old_id" >/dev/null 2>&1 || true
}

comp_podman() {
	have podman || fail "podman missing (package podman)"
	[ -x /usr/libexec/podman/catatonit ] || fail "podman's init /usr/libexec/podman/catatonit missing (package catatonit)"
	docker_up || fail "docker engine not running (the images come from it)"
	mkdir -p "$(dirname "$PODMAN_CONF")"
	local tmp
	tmp=$(mktemp "$PODMAN_CONF.XXXXXX")
	podman_conf >"$tmp"
	chmod 0644 "$tmp"
	if cmp -s "$tmp" "$PODMAN_CONF"; then
		rm -f "$tmp"
	else
		log "writing $PODMAN_CONF"
		mv -f "$tmp" "$PODMAN_CONF"
	fi
	[ "$(podman info --format '{{.Host.Security.Rootless}}' 2>/dev/null)" = false ] ||
		fail "podman does not run rootful: $(podman info 2>&1 | tail -n 3)"
	local hash
	hash=$(cat "$ROOTFS_BASH.recipe" 2>/dev/null) || fail "rootfs not built"
	ensure_podman_image "$IMAGE_BUSYBOX" "$hash"
	ensure_podman_image "$IMAGE_BASH" "$hash"
	# The short names (what the tests ask for) must find the localhost/ images, with --init.
	local out
	out=$(podman run --rm --init --pull=never "$IMAGE_BUSYBOX" sh -c 'echo hi; command -v bash || true' 2>&1) ||
		fail "podman run $IMAGE_BUSYBOX failed: $out"
	[ "$out" = hi ] || fail "podman run $IMAGE_BUSYBOX printed '$out' instead of 'hi'"
	out=$(podman run --rm --init --pull=never "$IMAGE_BASH" bash -lc 'echo "$BASH_VERSION"' 2>&1) ||
		fail "podman run $IMAGE_BASH failed: $out"
	[[ "$out" =~ ^[0-9]+\.[0-9]+ ]] || fail "podman run $IMAGE_BASH printed '$out' instead of a bash version"
	ok "ok (podman $(podman version --format '{{.Client.Version}}' 2>/dev/null), rootful, localhost/$IMAGE_BUSYBOX, localhost/$IMAGE_BASH)"
}

# ---------------------------------------------------------------- rootless podman
readonly ROOTLESS_USER=arservice-rootless

# as_rootless CMD...: CMD as the rootless user, with the environment of a login of its own.
as_rootless() {
	local uid gid home
	uid=$(id -u "$ROOTLESS_USER") gid=$(id -g "$ROOTLESS_USER")
	home=$(getent passwd "$ROOTLESS_USER" | cut -d: -f6)
	(cd / && setpriv --reuid="$uid" --regid="$gid" --init-groups -- \
		env HOME="$home" USER="$ROOTLESS_USER" LOGNAME="$ROOTLESS_USER" XDG_RUNTIME_DIR="/run/user/$uid" "$@")
}

# The user's own containers.conf: slirp4netns (rootless podman's default network) opens
# /dev/net/tun, which is mode 0600 on this machine kind, so its containers get no network.
# Its storage: the kernel's own overlay (rootless since 5.13; /dev/fuse is root's alone here,
# and without it podman would pick vfs, a full copy of the image per container).
rootless_containers_conf() {
	cat <<-'EOF'
		# Written by arservice .ci/testbed.sh. Rewritten when it differs.
		# /dev/net/tun is root's alone on this machine: slirp4netns cannot open it.
		[containers]
		netns = "none"
	EOF
}
rootless_storage_conf() {
	cat <<-'EOF'
		# Written by arservice .ci/testbed.sh. Rewritten when it differs.
		[storage]
		driver = "overlay"
	EOF
}

# write_as_user FILE CONTENT_FUNCTION: FILE owned by the rootless user, rewritten when it differs.
write_as_user() {
	local file=$1 tmp
	tmp=$(mktemp)
	"$2" >"$tmp"
	if ! cmp -s "$tmp" "$file"; then
		log "writing $file"
		install -D -m 0644 -o "$ROOTLESS_USER" -g "$ROOTLESS_USER" "$tmp" "$file"
	fi
	rm -f "$tmp"
}

comp_rootless() {
	have podman || fail "podman missing (package podman)"
	have setpriv || fail "setpriv missing (package util-linux)"
	have newuidmap || fail "newuidmap missing (package uidmap)"
	docker_up || fail "docker engine not running (the image comes from it)"
	if ! id "$ROOTLESS_USER" >/dev/null 2>&1; then
		log "creating user $ROOTLESS_USER"
		useradd --create-home --shell /bin/sh --comment "arservice test bed, rootless podman" "$ROOTLESS_USER" ||
			fail "useradd $ROOTLESS_USER failed"
	fi
	# useradd gives subordinate ids by login.defs; a user created otherwise may lack them.
	if ! grep -q "^$ROOTLESS_USER:" /etc/subuid || ! grep -q "^$ROOTLESS_USER:" /etc/subgid; then
		log "giving $ROOTLESS_USER subordinate ids"
		usermod --add-subuids 1100000-1165535 --add-subgids 1100000-1165535 "$ROOTLESS_USER" ||
			fail "usermod --add-subuids $ROOTLESS_USER failed"
	fi
	local uid home
	uid=$(id -u "$ROOTLESS_USER")
	home=$(getent passwd "$ROOTLESS_USER" | cut -d: -f6)
	# /run is a tmpfs: the runtime directory goes with every boot.
	install -d -m 0700 -o "$ROOTLESS_USER" -g "$ROOTLESS_USER" "/run/user/$uid"
	write_as_user "$home/.config/containers/containers.conf" rootless_containers_conf
	write_as_user "$home/.config/containers/storage.conf" rootless_storage_conf
	local info
	info=$(as_rootless podman info --format '{{.Host.Security.Rootless}} {{.Store.GraphDriverName}}' 2>&1) ||
		fail "podman info as $ROOTLESS_USER failed: $info"
	[ "$(tail -n 1 <<<"$info")" = "true overlay" ] || fail "podman as $ROOTLESS_USER is not rootless on overlay: $info"
	local hash have_hash
	hash=$(cat "$ROOTFS_BASH.recipe" 2>/dev/null) || fail "rootfs not built"
	have_hash=$(as_rootless podman image inspect -f "{{index .Config.Labels \"$RECIPE_LABEL\"}}" "localhost/$IMAGE_BUSYBOX" 2>/dev/null) || have_hash=""
	if [ "$have_hash" != "$hash" ]; then
		log "loading $IMAGE_BUSYBOX into $ROOTLESS_USER's store"
		"$DOCKER" save "$IMAGE_BUSYBOX" | as_rootless podman load -q >/dev/null ||
			fail "docker save $IMAGE_BUSYBOX | podman load as $ROOTLESS_USER failed"
		as_rootless podman image prune -f >/dev/null 2>&1 || true
	fi
	local out
	out=$(as_rootless podman run --rm --init --pull=never "$IMAGE_BUSYBOX" sh -c 'echo "hi $(id -u)"' 2>&1) ||
		fail "rootless podman run $IMAGE_BUSYBOX failed: $out"
	[ "$(tail -n 1 <<<"$out")" = "hi 0" ] || fail "rootless podman run printed '$out' instead of 'hi 0'"
	ok "ok (user $ROOTLESS_USER uid $uid, overlay, no network, localhost/$IMAGE_BUSYBOX)"
}

# ---------------------------------------------------------------- munge + slurm
munge_up() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ensure_munge() {
	have munged || fail "munged missing (package munge)"
	id munge >/dev/null 2>&1 || fail "user munge missing (package munge)"
	mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
	if [ ! -s /etc/munge/munge.key ]; then
		log "creating /etc/munge/munge.key"
		dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
	fi
	chown munge:munge /etc/munge /etc/munge/munge.key /var/log/munge /var/lib/munge /run/munge
	chmod 0700 /etc/munge /var/log/munge
	chmod 0400 /etc/munge/munge.key
	chmod 0711 /var/lib/munge
	chmod 0755 /run/munge
	munge_up && return 0
	log "starting munged"
	# munged daemonizes itself; it refuses to start as root on a socket owned by munge.
	runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 9>&- ||
		log "munged exited non-zero (maybe already starting)"
	wait_for 15 "munge -n | unmunge" munge_up ||
		fail "munge does not work: $(munge -n 2>&1 | unmunge 2>&1 | tail -n 2 | tr '\n' ' ') (see /var/log/munge/munged.log)"
}

slurm_conf() {
	local host=$1 cpus mem_mb
	cpus=$(nproc)
	# 90% of physical memory, rounded down to 256 MB: below what slurmd detects
	# (more would drain the node) and stable from run to run, unlike free memory.
	mem_mb=$(awk '/^MemTotal:/ { m = int($2 / 1024 * 0.9 / 256) * 256; if (m < 256) m = 256; print m }' /proc/meminfo)
	cat <<-EOF
		# Written by arservice .ci/testbed.sh -- single-node test cluster. Rewritten when it differs.
		ClusterName=arservice-test
		SlurmctldHost=$host(127.0.0.1)
		AuthType=auth/munge
		MpiDefault=none
		ProctrackType=proctrack/linuxproc
		TaskPlugin=task/none
		JobAcctGatherType=jobacct_gather/none
		AccountingStorageType=accounting_storage/none
		JobCompType=jobcomp/none
		SwitchType=switch/none
		SlurmUser=root
		SlurmdUser=root
		SlurmctldPort=6817
		SlurmdPort=6818
		StateSaveLocation=/var/spool/slurmctld
		SlurmdSpoolDir=/var/spool/slurmd
		SlurmctldPidFile=/run/slurmctld.pid
		SlurmdPidFile=/run/slurmd.pid
		SlurmctldLogFile=/var/log/slurm/slurmctld.log
		SlurmdLogFile=/var/log/slurm/slurmd.log
		SchedulerType=sched/backfill
		SelectType=select/cons_tres
		SelectTypeParameters=CR_Core
		ReturnToService=2
		InactiveLimit=0
		KillWait=5
		MinJobAge=60
		Waittime=0
		NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
		PartitionName=$SLURM_PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:64
	EOF
}

slurmctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { sinfo -h -n "$1" -o %t 2>/dev/null | head -n1; }
node_ready() { case "$(node_state "$1")" in idle | mix | alloc) return 0 ;; esac; return 1; }

comp_slurm() {
	local tool
	for tool in slurmctld slurmd sbatch srun sinfo scontrol munge unmunge; do
		have "$tool" || fail "$tool missing (packages slurm-wlm, munge)"
	done
	ensure_munge
	local host conf_changed=0
	host=$(hostname -s)
	mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
	local tmp
	tmp=$(mktemp "$SLURM_CONF_FILE.XXXXXX")
	slurm_conf "$host" >"$tmp"
	chmod 0644 "$tmp"
	if cmp -s "$tmp" "$SLURM_CONF_FILE"; then
		rm -f "$tmp"
	else
		log "writing $SLURM_CONF_FILE"
		mv -f "$tmp" "$SLURM_CONF_FILE"
		conf_changed=1
	fi

	if [ "$conf_changed" = 1 ] && { slurmctld_up || pid_alive /run/slurmd.pid slurmd; }; then
		log "configuration changed: restarting slurmctld and slurmd"
		scontrol shutdown >/dev/null 2>&1 || true
		local deadline=$((SECONDS + 30))
		while { pid_alive /run/slurmctld.pid slurmctld || pid_alive /run/slurmd.pid slurmd; } &&
			[ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
	fi

	if ! slurmctld_up; then
		if pid_alive /run/slurmctld.pid slurmctld; then
			log "slurmctld (pid $(cat /run/slurmctld.pid)) is starting, waiting"
		else
			log "starting slurmctld"
			setsid slurmctld </dev/null >/dev/null 2>&1 9>&- || log "slurmctld exited non-zero"
		fi
		wait_for "$TIMEOUT" "slurmctld" slurmctld_up || {
			tail -n 20 /var/log/slurm/slurmctld.log >&2 2>/dev/null || true
			fail "slurmctld does not answer (see /var/log/slurm/slurmctld.log)"
		}
	fi
	if ! pid_alive /run/slurmd.pid slurmd; then
		log "starting slurmd"
		setsid slurmd </dev/null >/dev/null 2>&1 9>&- || log "slurmd exited non-zero"
		wait_for 15 "slurmd" pid_alive /run/slurmd.pid slurmd || {
			tail -n 20 /var/log/slurm/slurmd.log >&2 2>/dev/null || true
			fail "slurmd did not start (see /var/log/slurm/slurmd.log)"
		}
	fi

	# Wait for the node to be usable; resume it if it is down or drained.
	local deadline=$((SECONDS + TIMEOUT)) state last_resume=-100
	until node_ready "$host"; do
		state=$(node_state "$host")
		case "$state" in
		down | drain | drng | drain* | down~ | inval | fail | failg)
			if [ $((SECONDS - last_resume)) -ge 5 ]; then
				log "node $host is '$state' ($(sinfo -h -n "$host" -o %E 2>/dev/null)), resuming"
				scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
				last_resume=$SECONDS
			fi
			;;
		esac
		if [ "$SECONDS" -ge "$deadline" ]; then
			tail -n 20 /var/log/slurm/slurmd.log >&2 2>/dev/null || true
			fail "node $host not idle after ${TIMEOUT}s (state '$state', $(sinfo -h -n "$host" -o %E 2>/dev/null))"
		fi
		sleep 0.5
	done

	# A sleeper job must start, accept an overlapping step and be cancelled.
	local job jstate out
	job=$(sbatch --parsable --chdir=/tmp --output=/dev/null --job-name=testbed-check \
		--partition="$SLURM_PARTITION" --wrap 'sleep 30' 2>&1) || fail "sbatch failed: $job"
	job=${job%%;*}
	deadline=$((SECONDS + 30))
	while :; do
		jstate=$(squeue -h -j "$job" -o %T 2>/dev/null)
		[ "$jstate" = RUNNING ] && break
		if [ "$SECONDS" -ge "$deadline" ]; then
			scancel "$job" >/dev/null 2>&1 || true
			fail "job $job stuck in '$jstate' ($(squeue -h -j "$job" -o %r 2>/dev/null))"
		fi
		sleep 0.2
	done
	out=$(timeout 30 srun --jobid="$job" --overlap echo step-ok 2>&1) || {
		scancel "$job" >/dev/null 2>&1 || true
		fail "srun --jobid=$job --overlap failed: $out"
	}
	scancel "$job" || fail "scancel $job failed"
	[ "$out" = step-ok ] || fail "srun step printed '$out' instead of 'step-ok'"
	ok "ok (slurm $(sinfo -V 2>/dev/null | awk '{print $2}'), node $host $(nproc) cpus, partition $SLURM_PARTITION, job $job ran)"
}

# ---------------------------------------------------------------- slurm, several nodes
# A second cluster beside the first, with its own slurm.conf, ports and state: several slurmd on
# this host, each its own node (`slurmd -N <node>`, its own Port=, `%n` in its files). The nodes
# share this host's kernel, processes and file systems (a shared home comes for free).
readonly MULTI_CONF=/etc/slurm-multi/slurm.conf
readonly MULTI_NODES=(n1 n2)
readonly MULTI_PARTITION=multi
readonly MULTI_CTLD_PORT=6819
readonly MULTI_FIRST_NODE_PORT=6831

multi_conf() {
	local host=$1 cpus=$2 port=$MULTI_FIRST_NODE_PORT node
	cat <<-EOF
		# Written by arservice .ci/testbed.sh -- several Slurm nodes on one host. Rewritten when it differs.
		ClusterName=arservice-multi
		SlurmctldHost=$host(127.0.0.1)
		AuthType=auth/munge
		MpiDefault=none
		ProctrackType=proctrack/linuxproc
		TaskPlugin=task/none
		JobAcctGatherType=jobacct_gather/none
		AccountingStorageType=accounting_storage/none
		JobCompType=jobcomp/none
		SwitchType=switch/none
		SlurmUser=root
		SlurmdUser=root
		SlurmctldPort=$MULTI_CTLD_PORT
		StateSaveLocation=/var/spool/slurmctld-multi
		SlurmdSpoolDir=/var/spool/slurmd-multi/%n
		SlurmctldPidFile=/run/slurmctld-multi.pid
		SlurmdPidFile=/run/slurmd-multi-%n.pid
		SlurmctldLogFile=/var/log/slurm/slurmctld-multi.log
		SlurmdLogFile=/var/log/slurm/slurmd-multi-%n.log
		SchedulerType=sched/backfill
		SelectType=select/cons_tres
		SelectTypeParameters=CR_Core
		ReturnToService=2
		# A node that stops answering is DOWN (and its jobs NODE_FAIL) within seconds, not 5 min.
		SlurmdTimeout=10
		# A job of a failed node is not started again elsewhere.
		JobRequeue=0
		InactiveLimit=0
		KillWait=5
		MinJobAge=60
		Waittime=0
	EOF
	for node in "${MULTI_NODES[@]}"; do
		echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=1024 State=UNKNOWN"
		port=$((port + 1))
	done
	echo "PartitionName=$MULTI_PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:64 LLN=YES"
}

multi_ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
multi_slurmd_alive() { pid_alive "/run/slurmd-multi-$1.pid" slurmd; }

comp_slurm_multi() {
	have slurmctld && have slurmd || fail "slurm missing (package slurm-wlm)"
	munge_up || fail "munge does not work (the slurm component sets it up)"
	export SLURM_CONF=$MULTI_CONF
	local host node conf_changed=0 tmp
	host=$(hostname -s)
	mkdir -p "$(dirname "$MULTI_CONF")" /var/spool/slurmctld-multi /var/log/slurm
	for node in "${MULTI_NODES[@]}"; do mkdir -p "/var/spool/slurmd-multi/$node"; done
	tmp=$(mktemp "$MULTI_CONF.XXXXXX")
	multi_conf "$host" "$(nproc)" >"$tmp"
	chmod 0644 "$tmp"
	if cmp -s "$tmp" "$MULTI_CONF"; then
		rm -f "$tmp"
	else
		log "writing $MULTI_CONF"
		mv -f "$tmp" "$MULTI_CONF"
		conf_changed=1
	fi
	if [ "$conf_changed" = 1 ] && { multi_ctld_up || pid_alive /run/slurmctld-multi.pid slurmctld; }; then
		log "configuration changed: restarting the second cluster"
		scontrol shutdown >/dev/null 2>&1 || true
		local deadline=$((SECONDS + 30)) alive
		while :; do
			alive=0
			pid_alive /run/slurmctld-multi.pid slurmctld && alive=1
			for node in "${MULTI_NODES[@]}"; do multi_slurmd_alive "$node" && alive=1; done
			[ "$alive" = 0 ] || [ "$SECONDS" -ge "$deadline" ] && break
			sleep 0.5
		done
	fi
	if ! multi_ctld_up; then
		if ! pid_alive /run/slurmctld-multi.pid slurmctld; then
			log "starting slurmctld of the second cluster"
			setsid slurmctld -f "$MULTI_CONF" </dev/null >/dev/null 2>&1 9>&- || log "slurmctld exited non-zero"
		fi
		wait_for "$TIMEOUT" "slurmctld (second cluster)" multi_ctld_up || {
			tail -n 20 /var/log/slurm/slurmctld-multi.log >&2 2>/dev/null || true
			fail "the second cluster's slurmctld does not answer (see /var/log/slurm/slurmctld-multi.log)"
		}
	fi
	for node in "${MULTI_NODES[@]}"; do
		if ! multi_slurmd_alive "$node"; then
			log "starting slurmd -N $node"
			setsid slurmd -f "$MULTI_CONF" -N "$node" </dev/null >/dev/null 2>&1 9>&- || log "slurmd -N $node exited non-zero"
			wait_for 15 "slurmd -N $node" multi_slurmd_alive "$node" || {
				tail -n 20 "/var/log/slurm/slurmd-multi-$node.log" >&2 2>/dev/null || true
				fail "slurmd -N $node did not start (see /var/log/slurm/slurmd-multi-$node.log)"
			}
		fi
	done
	local deadline=$((SECONDS + TIMEOUT)) state last_resume=-100 waiting
	while :; do
		waiting=""
		for node in "${MULTI_NODES[@]}"; do
			node_ready "$node" && continue
			waiting="$waiting $node"
			state=$(node_state "$node")
			case "$state" in
			down | drain | drng | drain* | down~ | inval | fail | failg)
				if [ $((SECONDS - last_resume)) -ge 5 ]; then
					log "node $node is '$state' ($(sinfo -h -n "$node" -o %E 2>/dev/null)), resuming"
					scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
					last_resume=$SECONDS
				fi
				;;
			esac
		done
		[ -z "$waiting" ] && break
		if [ "$SECONDS" -ge "$deadline" ]; then
			fail "nodes not idle after ${TIMEOUT}s:$waiting ($(sinfo -h -N -o '%N %t %E' 2>/dev/null | tr '\n' ';'))"
		fi
		sleep 0.5
	done
	# A step on each node must say where it ran.
	local out
	for node in "${MULTI_NODES[@]}"; do
		# shellcheck disable=SC2016 # expanded by the step's shell
		out=$(timeout 60 srun --partition="$MULTI_PARTITION" -w "$node" --chdir=/tmp sh -c 'echo $SLURMD_NODENAME' 2>&1) ||
			fail "srun -w $node failed: $out"
		[ "$out" = "$node" ] || fail "srun -w $node ran on '$out'"
	done
	ok "ok (cluster arservice-multi, nodes ${MULTI_NODES[*]} on $host, partition $MULTI_PARTITION, SLURM_CONF=$MULTI_CONF)"
}

# ---------------------------------------------------------------- main
# run_component NAME FUNCTION: run it in a subshell with errexit; never aborts the script.
run_component() {
	COMP=$1
	local rc t_start=${EPOCHREALTIME:-0}
	(
		set -e
		trap 'rc=$?; [ -e "$RESULTS/$COMP.err" ] || fail "command failed (exit $rc, line $LINENO): $BASH_COMMAND"' ERR
		"$2"
	)
	rc=$?
	if [ "$rc" -ne 0 ] && [ ! -e "$RESULTS/$COMP.err" ]; then
		printf 'failed (exit %s)\n' "$rc" >"$RESULTS/$COMP.err"
	fi
	awk -v a="$t_start" -v b="${EPOCHREALTIME:-0}" 'BEGIN { printf "%.1fs", b - a }' >"$RESULTS/$COMP.time"
	COMP=main
}

skip() { printf '%s\n' "$2" >"$RESULTS/$1.skip"; }

main() {
	# The first cluster is the default one; the second names its own (comp_slurm_multi).
	unset SLURM_CONF
	if [ "$(id -u)" -ne 0 ]; then
		echo "testbed: must run as root" >&2
		exit 1
	fi
	RESULTS=$(mktemp -d /tmp/arservice-testbed.XXXXXX)
	trap 'rm -rf "$RESULTS"' EXIT
	mkdir -p "$STATE_DIR"
	# One run at a time; the lock fd (9) is closed in every daemon started below.
	exec 9>"$STATE_DIR/.lock"
	if ! flock -w 900 9; then
		echo "testbed: another testbed.sh run holds $STATE_DIR/.lock" >&2
		exit 1
	fi

	local components=(packages python rootfs bwrap)
	run_component packages comp_packages
	run_component python comp_python
	run_component rootfs comp_rootfs
	run_component bwrap comp_bwrap
	if [ "${TESTBED_SKIP_DOCKER:-0}" = 1 ]; then
		skip docker "skipped (TESTBED_SKIP_DOCKER=1)"
		skip images "skipped (TESTBED_SKIP_DOCKER=1)"
	else
		run_component docker comp_docker
		if [ -e "$RESULTS/docker.ok" ]; then
			run_component images comp_images
		else
			printf 'not attempted: docker engine is not up\n' >"$RESULTS/images.err"
		fi
	fi
	components+=(docker images)
	if [ "${TESTBED_SKIP_PODMAN:-0}" = 1 ]; then
		skip podman "skipped (TESTBED_SKIP_PODMAN=1)"
		skip rootless "skipped (TESTBED_SKIP_PODMAN=1)"
	elif [ -e "$RESULTS/images.ok" ]; then
		run_component podman comp_podman
		run_component rootless comp_rootless
	else
		printf 'not attempted: the docker images are not there\n' >"$RESULTS/podman.err"
		printf 'not attempted: the docker images are not there\n' >"$RESULTS/rootless.err"
	fi
	components+=(podman rootless)
	if [ "${TESTBED_SKIP_SLURM:-0}" = 1 ]; then
		skip slurm "skipped (TESTBED_SKIP_SLURM=1)"
		skip slurm-multi "skipped (TESTBED_SKIP_SLURM=1)"
	else
		run_component slurm comp_slurm
		if [ -e "$RESULTS/slurm.ok" ]; then
			run_component slurm-multi comp_slurm_multi
		else
			printf 'not attempted: the first cluster (and munge) is not up\n' >"$RESULTS/slurm-multi.err"
		fi
	fi
	components+=(slurm slurm-multi)

	local c failed=0
	echo "==== arservice test bed ($(elapsed)s) ===="
	for c in "${components[@]}"; do
		if [ -e "$RESULTS/$c.ok" ]; then
			printf '%-12s %s [%s]\n' "$c:" "$(cat "$RESULTS/$c.ok")" "$(cat "$RESULTS/$c.time")"
		elif [ -e "$RESULTS/$c.skip" ]; then
			printf '%-12s %s\n' "$c:" "$(cat "$RESULTS/$c.skip")"
		else
			printf '%-12s FAILED: %s\n' "$c:" "$(cat "$RESULTS/$c.err" 2>/dev/null || echo unknown)"
			failed=1
		fi
	done
	echo "==== settings tests may use ===="
	echo "ARSERVICE_TEST_ROOTFS=$ROOTFS_BASH"
	echo "ARSERVICE_TEST_ROOTFS_BUSYBOX=$ROOTFS_BUSYBOX"
	echo "ARSERVICE_TEST_IMAGE_BUSYBOX=$IMAGE_BUSYBOX"
	echo "ARSERVICE_TEST_IMAGE_BASH=$IMAGE_BASH"
	echo "ARSERVICE_TEST_PODMAN_IMAGES=localhost/$IMAGE_BUSYBOX localhost/$IMAGE_BASH (short names find them)"
	echo "ARSERVICE_TEST_ROOTLESS_USER=$ROOTLESS_USER"
	echo "ARSERVICE_TEST_SLURM_PARTITION=$SLURM_PARTITION"
	echo "ARSERVICE_TEST_SLURM_MULTI_CONF=$MULTI_CONF (partition $MULTI_PARTITION, nodes ${MULTI_NODES[*]})"
	if [ "$failed" -ne 0 ]; then
		echo "testbed: FAILED (see the lines above)" >&2
		exit 1
	fi
	echo "testbed: all components ok"
}

main "$@"
