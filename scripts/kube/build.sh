#!/usr/bin/env bash
# Build a real Kubernetes v1.20.2 control plane (kube-apiserver, kube-scheduler, kube-controller-manager)
# for the tests, offline, and make etcd available (Debian's etcd-server: /usr/bin/etcd).
#
# Why this way: no registry reachable here ships Kubernetes binaries and Go module downloads are impossible,
# but Debian bookworm's `kubernetes` source package is the upstream v1.20.2 tree with every dependency
# vendored, and Debian's Go 1.19 builds it with two patches (facts: /work/shared/reference/kubernetes.md):
#  1. the vendored modern-go/reflect2 v1.0.1 crashes under Go >= 1.18 (SIGSEGV in mapiterinit): it is
#     replaced by Debian's reflect2 1.0.2 (golang-github-modern-go-reflect2-dev);
#  2. the vendored go-openapi validators' zero-value check treats "" as null under Go >= 1.19 and rejects
#     objects with empty strings: relaxed to a nil check.
# Steps: a private deb-src list (the system's apt setup is untouched) → `apt-get source --download-only`
# (only the orig tarball is used) → unpack → patch → `make gen_openapi` (the generated OpenAPI code is not in
# the tarball) → `go build` in GOPATH mode (module mode with -mod=vendor fails on this tree).
#
# Output: $COVE_KUBE_CACHE/bin/{kube-apiserver,kube-scheduler,kube-controller-manager} (default cache
# /var/cache/cove/kubernetes-1.20.2) and a stamp file there; with the stamp present it prints "kube: cached"
# and exits 0 at once. The build tree lives in $COVE_KUBE_CACHE/work and is removed after a successful build
# (several GB; COVE_KUBE_KEEP_WORK=1 keeps it); the downloaded tarball is kept. The full build output goes to
# $COVE_KUBE_CACHE/build.log. Installs its own build dependencies (golang-go rsync jq, and etcd-server).
# Exits non-zero with a message on failure. Needs root when packages are missing.
set -Eeuo pipefail

KUBE_VERSION=v1.20.2
CACHE="${COVE_KUBE_CACHE:-/var/cache/cove/kubernetes-1.20.2}"
BIN="$CACHE/bin"
STAMP="$BIN/.cove-built"
BINARIES=(kube-apiserver kube-scheduler kube-controller-manager)
# Bumped when the recipe changes, so that an older cache is rebuilt.
RECIPE="kubernetes $KUBE_VERSION go1.19 reflect2-1.0.2 openapi-nil-check"
DEPS=(golang-go rsync jq etcd-server)

STEP="start"
LOG="$CACHE/build.log"
log() { echo "kube: $*"; }
die() {
  echo "kube: FAILED ($STEP): $*" >&2
  exit 1
}
on_err() {
  local rc=$?
  [ "$BASHPID" = "$$" ] || return 0 # once, from the script itself, not from each $(...) it fails in
  echo "kube: FAILED during step: $STEP (exit status $rc)" >&2
  if [ -s "$LOG" ]; then
    echo "kube: last lines of $LOG:" >&2
    tail -n 25 "$LOG" >&2
  fi
}
trap on_err ERR

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

install_packages() {
  local missing=() p
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "packages ${missing[*]} are missing and installing them needs root"
  log "installing ${missing[*]}"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed"
  fi
}

cached() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE" ] || return 1
  local b
  for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
}

# --- 0. already built? ---------------------------------------------------------------------------------------
STEP="check the cache"
if cached; then
  STEP="install etcd-server"
  command -v etcd >/dev/null || install_packages etcd-server
  log "cached ($BIN)"
  exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found (this script is for Debian bookworm)"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9 # one build at a time; a second run waits, then finds the stamp
if cached; then
  log "cached ($BIN)"
  exit 0
fi
: >"$LOG"
t_start=$SECONDS

# --- 1. build dependencies and etcd --------------------------------------------------------------------------
STEP="install build dependencies"
install_packages "${DEPS[@]}"
go_version="$(go env GOVERSION 2>/dev/null || true)"
case "$go_version" in
  go1.19*) ;;
  *) die "this recipe is tested with Debian bookworm's Go 1.19 (golang-go); found '${go_version:-no go}'" ;;
esac

# --- 2. download the source package (kept across runs) -------------------------------------------------------
# Prints one-line "deb/deb-src" entries of the system's Debian archive for its release and -security suite
# (deb822 *.sources and one-line *.list files), each with the keyring it is signed by.
debian_entries() {
  local codename f
  codename="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release | tr -d '"' | head -n 1)"
  [ -n "$codename" ] || return 0
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v want="$codename" '
      function flush(   n, i, s, u, opts) {
        if (enabled != "no" && uris != "" && (" " types " ") ~ / deb /) {
          opts = (key ~ /^\//) ? "[signed-by=" key "] " : ""
          split(uris, u, /[ \t]+/)
          n = split(suites, s, /[ \t]+/)
          for (i = 1; i <= n; i++) if (s[i] == want || s[i] == want "-security") print opts u[1], s[i]
        }
        types = uris = suites = key = enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]/ { next }
      {
        k = tolower($0); sub(/:.*/, "", k); v = $0; sub(/^[^:]*:[ \t]*/, "", v); sub(/[ \t]+$/, "", v)
        if (k == "types") types = v; else if (k == "uris") uris = v; else if (k == "suites") suites = v
        else if (k == "signed-by") key = v; else if (k == "enabled") enabled = tolower(v)
      }
      END { flush() }
    ' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v want="$codename" '$1 == "deb" && ($(NF - 1) == want || $(NF - 1) == want "-security") {
      $1 = ""; $NF = ""; sub(/^ /, ""); sub(/ $/, ""); print }' "$f"
  done
}

dl="$CACHE/download"
tarball="$(find "$dl" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' -print -quit 2>/dev/null || true)"
reflect2_deb="$(find "$dl" -maxdepth 1 -name 'golang-github-modern-go-reflect2-dev_*.deb' -print -quit 2>/dev/null || true)"
if [ -z "$tarball" ] || [ -z "$reflect2_deb" ]; then
  STEP="find the Debian archive in the system's apt sources"
  entries="$(debian_entries | sort -u)"
  [ -n "$entries" ] || die "no enabled Debian bookworm entry in /etc/apt/sources.list(.d)"
  apt_dir="$CACHE/apt"
  rm -rf "$apt_dir"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/sources.list.d"
  # "main" only: both packages are there. The binary list too, for reflect2's .deb.
  while read -r entry; do
    echo "deb-src $entry main"
    echo "deb $entry main"
  done <<<"$entries" >"$apt_dir/sources.list"
  APT_PRIVATE=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
  STEP="apt-get update (private deb-src list)"
  log "downloading the kubernetes source package (about 35 MB)"
  apt-get "${APT_PRIVATE[@]}" update -qq >>"$LOG" 2>&1 || die "apt-get update of the private deb-src list failed (see $LOG)"
  part="$CACHE/download.part"
  rm -rf "$part"
  mkdir -p "$part" "$dl"
  # _apt (apt's download sandbox user) must be able to write here, or apt downloads as root with a notice.
  if id _apt >/dev/null 2>&1; then chown _apt "$part"; fi
  STEP="apt-get source --download-only kubernetes"
  # The .dsc and Debian parts are not needed; a failure there is tolerated if the orig tarball arrived.
  (cd "$part" && apt-get "${APT_PRIVATE[@]}" source --download-only -qq kubernetes >>"$LOG" 2>&1) || true
  got="$(find "$part" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' -print -quit)"
  [ -n "$got" ] || die "kubernetes_*.orig.tar.* was not downloaded (see $LOG)"
  STEP="apt-get download golang-github-modern-go-reflect2-dev"
  (cd "$part" && apt-get "${APT_PRIVATE[@]}" download -qq golang-github-modern-go-reflect2-dev >>"$LOG" 2>&1) \
    || die "could not download golang-github-modern-go-reflect2-dev (see $LOG)"
  # Only complete, hash-checked downloads land in $dl.
  for f in "$part"/kubernetes_*.orig.tar.* "$part"/golang-github-modern-go-reflect2-dev_*.deb; do
    chown root:root "$f" 2>/dev/null || true
    mv -f "$f" "$dl/"
  done
  rm -rf "$part" "$apt_dir"
  tarball="$(find "$dl" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' -print -quit)"
  reflect2_deb="$(find "$dl" -maxdepth 1 -name 'golang-github-modern-go-reflect2-dev_*.deb' -print -quit)"
fi

# --- 3. unpack and patch -------------------------------------------------------------------------------------
STEP="unpack $(basename "$tarball")"
work="$CACHE/work"
rm -rf "$work" # a half-built tree is not trusted: unpacking is quick, compiling is what takes the time
mkdir -p "$work/gopath/src/k8s.io" "$work/reflect2" "$work/unpack"
log "unpacking $(basename "$tarball")"
tar -xf "$tarball" -C "$work/unpack"
src="$(find "$work/unpack" -mindepth 1 -maxdepth 1 -type d -print -quit)" # kubernetes-1.20.2
[ -f "$src/cmd/kube-apiserver/apiserver.go" ] || die "$tarball does not hold a Kubernetes tree (no cmd/kube-apiserver)"
ln -s "$src" "$work/gopath/src/k8s.io/kubernetes"

STEP="patch 1: vendored reflect2 -> Debian's 1.0.2"
dpkg-deb -x "$reflect2_deb" "$work/reflect2"
r2="$work/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2"
[ -f "$r2/reflect2.go" ] || die "$reflect2_deb holds no reflect2 sources"
rsync -a --delete --exclude '*_test.go' "$r2/" "$src/vendor/github.com/modern-go/reflect2/"

STEP="patch 2: go-openapi zero-value check"
old='if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {'
for f in "$src/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go" "$src/vendor/github.com/go-openapi/validate/type.go"; do
  [ -f "$f" ] || continue
  grep -qF "$old" "$f" || die "$f does not have the expected zero-value check (is this the v1.20.2 tree?)"
  sed -i "s/$(printf '%s' "$old" | sed 's/[][\.*^$/]/\\&/g')/if data == nil {/" "$f"
  ! grep -qF "$old" "$f" || die "could not patch $f"
  patched=1
done
[ "${patched:-}" = 1 ] || die "no vendored go-openapi validator found to patch"

# --- 4. generate and build -----------------------------------------------------------------------------------
# Offline, reproducible: no proxy, no cgo (static binaries), our own build cache under $CACHE.
export GOPROXY=off GOFLAGS= GOCACHE="$work/gocache" CGO_ENABLED=0 GOPATH="$work/gopath" HOME="$work"
cd "$work/gopath/src/k8s.io/kubernetes"
STEP="make gen_openapi"
log "generating the OpenAPI code (make gen_openapi, about 1-2 min)"
t0=$SECONDS
make gen_openapi >>"$LOG" 2>&1 || die "make gen_openapi failed (see $LOG)"
log "generated in $((SECONDS - t0)) s"

ldflags="-s -w"
for p in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=20 -X $p.gitTreeState=clean"
done
mkdir -p "$BIN"
rm -f "$STAMP"
for b in "${BINARIES[@]}"; do
  STEP="go build $b"
  case "$b" in
    kube-apiserver) log "building kube-apiserver (about 5 min on 2 cores)" ;;
    *) log "building $b (mostly the shared build cache now: about 1-2 min)" ;;
  esac
  t0=$SECONDS
  GO111MODULE=off go build -ldflags "$ldflags" -o "$BIN/$b.part" "./cmd/$b" >>"$LOG" 2>&1 \
    || die "go build ./cmd/$b failed (see $LOG)"
  v="$("$BIN/$b.part" --version 2>&1 || true)"
  [ "$v" = "Kubernetes $KUBE_VERSION" ] || die "$b --version says '$v', not 'Kubernetes $KUBE_VERSION'"
  mv -f "$BIN/$b.part" "$BIN/$b"
  log "built $b in $((SECONDS - t0)) s ($(du -h "$BIN/$b" | cut -f1))"
done

cd /
echo "$RECIPE" >"$STAMP"
if [ "${COVE_KUBE_KEEP_WORK:-}" != 1 ]; then rm -rf "$work"; fi
log "done in $((SECONDS - t_start)) s: $BIN"
