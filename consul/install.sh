#!/usr/bin/env bash
# Make a Consul agent binary available and print its absolute path.
#
#   consul/install.sh            -> last (and only) line on stdout: /abs/path/to/consul
#
# Progress and errors go to stderr. Order of preference:
#   1. `consul` on PATH if `consul version` reports the pinned major.minor;
#   2. the cached build  $CACHE/consul/<version>/consul  if it runs;
#   3. otherwise build it from the Go module github.com/hashicorp/consul@v<version>
#      with the local Go toolchain (cold build: ~6 min and ~240 modules on 2 cores)
#      and cache it.
#
# Environment:
#   SUBSYS_CONSUL_VERSION  Consul version to use (default: CONSUL_VERSION below)
#   SUBSYS_CACHE_DIR       cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/subsys)
#
# Why v1.16.3: Consul changed licence from MPL-2.0 to the Business Source
# Licence (BUSL-1.1) in August 2023. v1.16.3 is the newest release that the Go
# module proxy serves whose LICENSE -- and the LICENSE of every nested module it
# pulls (api v1.25.1, sdk v0.14.1, proto-public v0.4.1, envoyextensions v0.4.1,
# troubleshoot v0.3.1) -- is still MPL-2.0; v1.16.6 is BUSL, v1.16.4 and
# v1.16.5 cannot be fetched. See consul/README.md. The script refuses to build
# any version whose LICENSE files are not MPL-2.0.
set -euo pipefail

CONSUL_VERSION="1.16.3"

VERSION="${SUBSYS_CONSUL_VERSION:-$CONSUL_VERSION}"
VERSION="${VERSION#v}"
MAJOR_MINOR="$(printf '%s' "$VERSION" | cut -d. -f1,2)"
MODULE="github.com/hashicorp/consul"
# Nested modules that Consul's go.mod `replace`s with local directories
# (./api, ./sdk, ...) which are not part of the module zip.
NESTED_MODULES=(api sdk proto-public envoyextensions troubleshoot)

CACHE_ROOT="${SUBSYS_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:?HOME is not set}/.cache}/subsys}"
DEST_DIR="$CACHE_ROOT/consul/$VERSION"
DEST="$DEST_DIR/consul"

log() { printf 'consul/install.sh: %s\n' "$*" >&2; }
die() { printf 'consul/install.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# Version number printed by `<binary> version` ("Consul v1.16.3" -> 1.16.3).
binary_version() {
    "$1" version 2>/dev/null | sed -n '1s/^Consul v\([0-9][0-9.]*\).*/\1/p'
}

abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$(cd "$(dirname "$1")" && pwd -P)" "$(basename "$1")" ;;
    esac
}

# Fails (non-zero) unless $1/LICENSE is the MPL-2.0 text.
is_mpl() {
    local lic="$1/LICENSE"
    [ -f "$lic" ] || return 1
    grep -q 'Mozilla Public License, version 2.0' "$lic" || return 1
    ! grep -qi 'Business Source License' "$lic"
}

use() {
    log "using $1 (Consul v$(binary_version "$1"))"
    printf '%s\n' "$1"
    exit 0
}

# --- 1. consul on PATH -------------------------------------------------------
# Only the major.minor is compared: a packaged 1.16.x is API-compatible. (It is
# the user's own binary, not a module this project builds or ships.)
if path_consul="$(command -v consul 2>/dev/null)" && [ -n "$path_consul" ]; then
    path_consul="$(abspath "$path_consul")"
    v="$(binary_version "$path_consul" || true)"
    if [ -n "$v" ] && [ "$(printf '%s' "$v" | cut -d. -f1,2)" = "$MAJOR_MINOR" ]; then
        use "$path_consul"
    fi
    log "ignoring $path_consul (Consul '${v:-?}', want $MAJOR_MINOR.x)"
fi

# --- 2. cached build ---------------------------------------------------------
cached_ok() { [ -x "$DEST" ] && "$DEST" version >/dev/null 2>&1; }
if cached_ok; then
    use "$DEST"
fi

# --- 3. build ----------------------------------------------------------------
command -v go >/dev/null 2>&1 || die "Go is not installed, and it is needed to build Consul v$VERSION.
Install Go >= 1.21, e.g. \`apt-get install golang\` (check \`go version\`) or from https://go.dev/dl/, then re-run $0."
go_ver="$(go env GOVERSION 2>/dev/null || true)"           # e.g. go1.26.8
go_mm="$(printf '%s' "${go_ver#go}" | cut -d. -f1,2)"
go_major="${go_mm%%.*}"; go_minor="${go_mm#*.}"
if ! [[ "$go_major" =~ ^[0-9]+$ && "$go_minor" =~ ^[0-9]+$ ]] ||
    [ "$go_major" -lt 1 ] || { [ "$go_major" -eq 1 ] && [ "$go_minor" -lt 21 ]; }; then
    die "found '${go_ver:-unknown}' at $(command -v go), but building Consul needs Go >= 1.21.
Install a newer Go, e.g. \`apt-get install golang\` or from https://go.dev/dl/."
fi

mkdir -p "$DEST_DIR"

# Serialise concurrent invocations: only one of them builds, the others wait
# and then pick up its result.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$DEST_DIR/.lock"
    if ! flock -n 9; then
        log "another install.sh is building Consul v$VERSION; waiting for it..."
        flock 9
    fi
    if cached_ok; then
        use "$DEST"
    fi
else
    log "warning: flock not found; not protected against concurrent builds"
fi

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/subsys-consul-build.XXXXXX")"
TMP_BIN="$DEST_DIR/.consul.tmp.$$"
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    if [ -d "$SCRATCH" ]; then
        chmod -R u+w "$SCRATCH" 2>/dev/null || true
        rm -rf "$SCRATCH"
    fi
    rm -f "$TMP_BIN"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start=$SECONDS
log "building Consul v$VERSION with $go_ver into $DEST"
log "(cold build: several minutes and a few hundred modules; progress below)"

# Every command below writes its output to stderr: stdout is reserved for the path.
{
    cd "$SCRATCH"
    export GOWORK=off
    # Keep the user's GOFLAGS (e.g. -buildvcs=false) but force -mod=mod: the
    # edited go.mod needs go.sum additions that are not in the release's go.sum.
    goflags=""
    for f in $(go env GOFLAGS); do
        case "$f" in -mod=*|-buildvcs*) ;; *) goflags="$goflags $f" ;; esac
    done
    export GOFLAGS="${goflags# } -mod=mod -buildvcs=false"
    export GOFLAGS="${GOFLAGS# }"

    log "downloading $MODULE@v$VERSION"
    dl_json="$(go mod download -json "$MODULE@v$VERSION" 2>&1)" || true
    src="$(printf '%s\n' "$dl_json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' | head -n1)"
    if [ -z "$src" ] || [ ! -f "$src/go.mod" ]; then
        err="$(printf '%s\n' "$dl_json" | sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p')"
        die "could not download $MODULE@v$VERSION: ${err:-$dl_json}"
    fi
    is_mpl "$src" || die "$MODULE@v$VERSION is not MPL-2.0 licensed ($src/LICENSE); refusing to build it.
Consul moved to the Business Source License; only MPL-2.0 releases may be used here."

    cp -R "$src" "$SCRATCH/src"
    chmod -R u+w "$SCRATCH/src"
    cd "$SCRATCH/src"

    # Drop the `replace ./api` etc. directives (those directories are not in the
    # module zip) so Go resolves the versions that go.mod `require`s instead.
    drop=()
    for m in "${NESTED_MODULES[@]}"; do drop+=("-dropreplace=$MODULE/$m"); done
    go mod edit "${drop[@]}"

    # The checksum database does not answer for some of the nested modules
    # (e.g. envoyextensions@v0.4.1 -> 404), so skip it for those paths only;
    # everything else is still verified against Consul's go.sum / sum.golang.org.
    nosum=""
    for m in "${NESTED_MODULES[@]}"; do nosum="$nosum,$MODULE/$m"; done
    export GONOSUMDB="${GONOSUMDB:+$GONOSUMDB}$nosum"
    export GONOSUMDB="${GONOSUMDB#,}"

    log "resolving nested modules (${NESTED_MODULES[*]})"
    nested=()
    for m in "${NESTED_MODULES[@]}"; do
        if go list -m "$MODULE/$m" >/dev/null 2>&1; then nested+=("$MODULE/$m"); fi
    done
    if [ "${#nested[@]}" -gt 0 ]; then
        go mod download "${nested[@]}" || die "could not download Consul's nested modules"
        for m in "${nested[@]}"; do
            line="$(go list -m -f '{{.Path}}@{{.Version}} {{.Dir}}' "$m")"
            dir="${line#* }"
            is_mpl "$dir" || die "${line%% *} is not MPL-2.0 licensed ($dir/LICENSE); refusing to build."
            log "  ${line%% *}: MPL-2.0"
        done
    fi

    # v1.16.3 builds unpatched with Go 1.21..1.26 (checked with go1.26.8): no
    # go:linkname or other fixes are needed. -s -w only strips the symbol table
    # (168 MB -> 120 MB); -trimpath makes the build reproducible.
    log "compiling (go build -trimpath, GOFLAGS='$GOFLAGS')"
    if ! go build -trimpath -ldflags='-s -w' -o "$TMP_BIN" .; then
        die "go build of Consul v$VERSION failed with $go_ver (see the errors above).
If a dependency no longer compiles with this Go, bump it in the scratch copy (go get dep@version) and add that step to $0."
    fi
} >&2

built_v="$(binary_version "$TMP_BIN" || true)"
[ "$built_v" = "$VERSION" ] || die "built binary reports version '${built_v:-?}', expected $VERSION"
chmod 0755 "$TMP_BIN"
mv -f "$TMP_BIN" "$DEST"
log "built Consul v$VERSION in $((SECONDS - start))s: $DEST"
use "$DEST"
