# shellcheck shell=bash
# Shared by the stand-ins `apptainer` and `enroot` (sourced, never run).
#
# The stand-ins exist because neither tool can be installed on the test machine. Each accepts
# exactly the command lines arservice uses (anything else: a message on stderr and exit 2, so
# that a drift between src/env/*.rs and the stand-in shows), prints what the real tool prints
# where arservice reads it, and really runs commands over a root filesystem exported from the
# local Docker engine (apptainer through bubblewrap, enroot in a mount namespace of its own, as
# the real tools do it), the processes in the host's pid namespace with exactly the environment
# the real tool would give them. Where the real tool does something to a command that matters
# to arservice (its source, as reviewed in issue 20), the stand-in does it too, and says where
# in the tool's source it comes from.
#
# Every call is appended to "$STANDIN_STATE/calls.log", one line per call (the argv, quoted
# with printf %q), so that tests can count conversions. STANDIN_STATE defaults to
# /tmp/arservice-standin: the server passes its own environment on to the tools.

set -euo pipefail

STANDIN_STATE="${STANDIN_STATE:-/tmp/arservice-standin}"

# PATH inside the sandbox when neither the image nor the caller sets one.
# shellcheck disable=SC2034
readonly STANDIN_DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# The first line of a converted image (a small text file standing in for a SIF or squashfs).
readonly STANDIN_IMAGE_MAGIC="ARSERVICE-STANDIN-IMAGE 1"

# Appends this call's argv to calls.log.
standin_log_call() {
    mkdir -p "$STANDIN_STATE"
    local line
    printf -v line '%q ' "$STANDIN_TOOL" "$@"
    printf '%s\n' "${line% }" >>"$STANDIN_STATE/calls.log"
}

# A command line outside the subset this stand-in implements.
standin_reject() {
    {
        printf '%s stand-in: unsupported command line:' "$STANDIN_TOOL"
        printf ' %q' "$@"
        printf '\n%s stand-in: %s\n' "$STANDIN_TOOL" "$STANDIN_USAGE"
    } >&2
    exit 2
}

# True when $1 can go into an overlay mount option unquoted.
standin_overlay_safe() {
    [[ "$1" != *[,:\\]* && "$1" != *$'\n'* ]]
}

# standin_convert IMAGE_REF OUT FAIL_PREFIX FAIL_CODE: exports the local Docker image IMAGE_REF into a
# root filesystem next to OUT and writes OUT, the image file that names it. The rootfs goes to
# "${OUT%.partial}.rootfs" (arservice converts to "<x>.partial" and renames that to "<x>", so
# the directory is named after the final file); OUT holds its absolute path, the source and
# the image's ENV lines. Errors are printed as "$FAIL_PREFIX <why>", exit $FAIL_CODE.
standin_convert() {
    local ref="$1" out="$2" fail="$3" code="$4"
    if ! docker image inspect "$ref" >/dev/null 2>&1; then
        printf '%s %s: no such image in the local Docker engine (the stand-in reads images from there: no registry here)\n' \
            "$fail" "$ref" >&2
        exit "$code"
    fi
    local base
    base="$(cd "$(dirname "$out")" && pwd -P)/$(basename "$out")"
    local rootfs="${base%.partial}.rootfs"
    local tmp="${rootfs}.tmp.$$"
    local container=""
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'; [ -z \"\${container:-}\" ] || docker rm -f \"\$container\" >/dev/null 2>&1 || true" EXIT
    rm -rf "$tmp"
    mkdir -p "$tmp"
    container=$(docker create "$ref" /bin/sh)
    docker export "$container" | tar -C "$tmp" -xf -
    docker rm -f "$container" >/dev/null
    container=""
    rm -rf "$rootfs"
    mv "$tmp" "$rootfs"
    trap - EXIT
    {
        printf '%s\n' "$STANDIN_IMAGE_MAGIC"
        printf 'rootfs=%s\n' "$rootfs"
        docker image inspect --format '{{if .Config}}{{range .Config.Env}}env={{println .}}{{end}}{{end}}' "$ref"
    } >"$out"
}

# standin_image_field FILE KEY: the value of "KEY=..." in an image file (first match).
standin_image_field() {
    local line
    while IFS= read -r line; do
        if [[ "$line" == "$2="* ]]; then
            printf '%s' "${line#"$2="}"
            return 0
        fi
    done <"$1"
    return 1
}

# True when FILE is an image file written by standin_convert whose rootfs still exists.
standin_is_image() {
    [ -f "$1" ] && [ "$(head -n 1 "$1" 2>/dev/null)" = "$STANDIN_IMAGE_MAGIC" ] &&
        [ -d "$(standin_image_field "$1" rootfs)" ]
}

# standin_image_env FILE: prints the image's ENV entries, one NAME=value a line.
standin_image_env() {
    local line
    while IFS= read -r line; do
        [[ "$line" == env=?* ]] && printf '%s\n' "${line#env=}"
    done <"$1"
    return 0
}

# "device:inode" of a directory, to recognise it as some process's root.
standin_dir_id() {
    stat -L -c '%d:%i' "$1" 2>/dev/null
}

# True while process $1 exists.
standin_alive() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null
}
