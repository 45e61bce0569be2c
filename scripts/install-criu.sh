#!/usr/bin/env bash
# Make CRIU >= 4.1 available as /usr/local/sbin/criu on Debian 12 (bookworm), as root.
#
# Why: bookworm's criu 3.17 fails on current kernels (vDSO layout) and trixie's binary package needs a newer
# libc, so this builds CRIU from Debian trixie's source tarball (recipe: /work/shared/reference/criu.md).
#  1. a private apt sources list with one `deb-src <system's Debian URI> trixie main` line (same Signed-By
#     keyring as the system's own sources) and private lists/cache dirs: the system's apt setup is untouched;
#  2. `apt-get source --download-only criu=VERSION`: only the orig tarball is needed (the .dsc/.debian parts
#     may fail to download; that is tolerated as long as the orig tarball is there);
#  3. install the build dependencies, `make criu`, install the binary, and check that `criu check` says "Looks good".
# Idempotent: exits at once if a criu >= 4.1 is already there. Work dir: /var/cache/cove-criu (the downloaded
# tarball is kept there; the build tree is removed after a successful install). Exits non-zero on failure.
#
# Overrides (environment): CRIU_DEB_VERSION (default 4.1.1-1), CRIU_SUITE (trixie), CRIU_WORK_DIR,
# CRIU_DEBIAN_URI / CRIU_DEBIAN_KEYRING (default: derived from the system's apt sources).
set -Eeuo pipefail

CRIU_MIN=4.1
CRIU_DEB_VERSION="${CRIU_DEB_VERSION:-4.1.1-1}"
CRIU_SUITE="${CRIU_SUITE:-trixie}"
WORK="${CRIU_WORK_DIR:-/var/cache/cove-criu}"
TARGET=/usr/local/sbin/criu
BUILD_DEPS=(build-essential pkg-config libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
  python3-protobuf libnl-3-dev libnet1-dev libcap-dev libaio-dev libbsd-dev libgnutls28-dev libnftables-dev
  uuid-dev libdrm-dev)

STEP="start"
PATCH_ID=passcred-eopnotsupp
log() { echo "install-criu: $*"; }
die() { echo "install-criu: FAILED ($STEP): $*" >&2; exit 1; }
trap 'echo "install-criu: FAILED during step: $STEP (command at line $LINENO exited with $?)" >&2' ERR

# Prints the version of the criu binary $1 ("4.1.1"), or nothing.
criu_version() {
  { "$1" --version 2>/dev/null || true; } | awk '/^Version:/ { print $2; exit }'
}
# True if version $1 >= $CRIU_MIN.
version_ok() {
  [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$CRIU_MIN" "$1" | sort -V | head -n 1)" = "$CRIU_MIN" ]
}

# --- 0. already there? -------------------------------------------------------------------------------------
STEP="check existing criu"
candidates=("$TARGET")
while IFS= read -r p; do candidates+=("$p"); done < <(type -ap criu || true)
seen=" "
for c in "${candidates[@]}"; do
  r="$(readlink -f "$c" 2>/dev/null || echo "$c")"
  case "$seen" in *" $r "*) continue ;; esac   # /sbin/criu and /usr/sbin/criu are one file (usrmerge)
  seen="$seen$r "
  if [ -x "$c" ]; then
    v="$(criu_version "$c")"
    # 4.1.x needs our socket-option patch (below) on Linux >= 6.16; ours leaves a stamp beside it.
    if version_ok "$v" && { [ -f "$c.cove-$PATCH_ID" ] || [ "$(printf '%s\n' "$v" 4.2 | sort -V | head -n1)" = 4.2 ]; }; then
      log "criu $v already installed at $c (>= $CRIU_MIN); nothing to do"; exit 0
    fi
    [ -n "$v" ] && log "found criu $v at $c (too old, need >= $CRIU_MIN)"
  fi
done

[ "$(id -u)" = 0 ] || die "must run as root (installs packages and $TARGET)"
command -v apt-get >/dev/null || die "apt-get not found (this script is for Debian)"

mkdir -p "$WORK"
exec 9>"$WORK/.lock"
flock 9   # one run at a time

upstream="${CRIU_DEB_VERSION#*:}"   # strip an epoch
upstream="${upstream%-*}"           # strip the Debian revision: 4.1.1-1 -> 4.1.1

# --- 1. find the system's Debian archive URI and keyring --------------------------------------------------
# Prints "URI KEYRING" (KEYRING "-" if none) of the first enabled entry whose suite is exactly the system's codename
# (so the main archive, not -security/-updates). Reads deb822 *.sources files and one-line *.list files.
find_debian_source() {
  local codename
  codename="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release | tr -d '"' | head -n 1)"
  [ -n "$codename" ] || return 0
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v want="$codename" '
      function flush(   n, i, s, t, ok) {
        if (enabled != "no" && uris != "") {
          ok = 0; n = split(types, t, /[ \t]+/); for (i = 1; i <= n; i++) if (t[i] == "deb" || t[i] == "deb-src") ok = 1
          if (ok) { ok = 0; n = split(suites, s, /[ \t]+/); for (i = 1; i <= n; i++) if (s[i] == want) ok = 1 }
          if (ok) { split(uris, s, /[ \t]+/); print s[1], (key ~ /^\// ? key : "-"); found = 1; exit }
        }
        types = uris = suites = key = enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]/ { next }   # continuation line (e.g. an inline key block)
      {
        k = tolower($0); sub(/:.*/, "", k); v = $0; sub(/^[^:]*:[ \t]*/, "", v); sub(/[ \t]+$/, "", v)
        if (k == "types") types = v; else if (k == "uris") uris = v; else if (k == "suites") suites = v
        else if (k == "signed-by") key = v; else if (k == "enabled") enabled = tolower(v)
      }
      END { if (!found) flush() }
    ' "$f" | head -n 1
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v want="$codename" '
      /^[ \t]*#/ || NF < 3 { next }
      $1 == "deb" || $1 == "deb-src" {
        key = "-"; i = 2
        if ($2 ~ /^\[/) {
          for (; i <= NF; i++) {
            o = $i; gsub(/[\[\]]/, "", o)
            if (tolower(o) ~ /^signed-by=/) { sub(/^[^=]*=/, "", o); key = o }
            if ($i ~ /\]$/) { i++; break }
          }
        }
        if ($(i + 1) == want) { print $i, (key ~ /^\// ? key : "-"); exit }
      }
    ' "$f"
  done
}

# --- 2. download the orig tarball (kept across runs) -----------------------------------------------------
tarball="$(find "$WORK" -maxdepth 1 -name "criu_${upstream}.orig.tar.*" -print -quit)"
if [ -n "$tarball" ]; then
  log "using downloaded $tarball"
else
  STEP="find the Debian archive in the system's apt sources"
  uri="${CRIU_DEBIAN_URI:-}" found_key=""
  keyring="${CRIU_DEBIAN_KEYRING:-}"
  if [ -z "$uri" ]; then
    read -r uri found_key < <(find_debian_source | head -n 1) || true
    [ -n "$uri" ] || die "no enabled Debian entry for this release in /etc/apt/sources.list(.d); set CRIU_DEBIAN_URI"
    [ -n "$keyring" ] || keyring="$found_key"
  fi
  opts=""
  if [ -n "$keyring" ] && [ "$keyring" != "-" ]; then
    [ -r "$keyring" ] || die "keyring $keyring (from the system's apt sources) is not readable"
    opts="[signed-by=$keyring] "
  fi

  STEP="apt-get update (private deb-src list for $CRIU_SUITE)"
  apt_dir="$WORK/apt"
  rm -rf "$apt_dir"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/sources.list.d"
  echo "deb-src ${opts}${uri} ${CRIU_SUITE} main" > "$apt_dir/sources.list"
  APT_PRIVATE=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
  log "source: deb-src ${opts}${uri} ${CRIU_SUITE} main"
  t0=$SECONDS
  apt-get "${APT_PRIVATE[@]}" update -qq || die "apt-get update of the private $CRIU_SUITE deb-src list failed"

  STEP="apt-get source --download-only criu=$CRIU_DEB_VERSION"
  dl="$WORK/download"
  rm -rf "$dl"
  mkdir -p "$dl"
  # _apt (apt's download sandbox user) must be able to write here, or apt downloads as root with a notice.
  if id _apt >/dev/null 2>&1; then chown _apt "$dl"; fi
  if ! (cd "$dl" && apt-get "${APT_PRIVATE[@]}" source --download-only -qq "criu=$CRIU_DEB_VERSION"); then
    log "apt-get source reported errors (the .dsc/.debian parts may be missing); checking for the orig tarball"
  fi
  got="$(find "$dl" -maxdepth 1 -name "criu_${upstream}.orig.tar.*" -print -quit)"
  [ -n "$got" ] || die "criu_${upstream}.orig.tar.* was not downloaded (is criu $CRIU_DEB_VERSION in $CRIU_SUITE?)"
  tarball="$WORK/$(basename "$got")"
  mv -f "$got" "$tarball"   # only a complete, hash-checked download lands in $WORK
  chown root:root "$tarball"
  rm -rf "$dl" "$apt_dir"
  log "downloaded $(basename "$tarball") ($(du -h "$tarball" | cut -f1)) in $((SECONDS - t0)) s"
fi

# --- 3. build dependencies ---------------------------------------------------------------------------------
STEP="install build dependencies"
missing=()
for p in "${BUILD_DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing build dependencies: ${missing[*]}"
  t0=$SECONDS
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed"
  fi
  log "build dependencies installed in $((SECONDS - t0)) s"
fi

# --- 4. unpack and build -----------------------------------------------------------------------------------
STEP="unpack $(basename "$tarball")"
build="$WORK/build"
if [ ! -f "$build/Makefile" ]; then   # a tree left by a failed run is reused (make is incremental)
  rm -rf "$build"
  mkdir -p "$build"
  tar -xf "$tarball" -C "$build" --strip-components=1 || die "could not unpack $tarball"
fi

# Linux >= 6.16 accepts SO_PASSCRED/SO_PASSSEC only on unix and netlink sockets; CRIU 4.1.1 aborts the
# dump of any TCP/UDP socket on the resulting EOPNOTSUPP. Treat the option as off there (the upstream fix).
STEP="patch socket options"
if ! grep -q "cove: $PATCH_ID" "$build/criu/sockets.c"; then
  python3 - "$build/criu/sockets.c" <<'PY' || die "could not patch criu/sockets.c"
import sys
path = sys.argv[1]
src = open(path).read()
old = "\tif (getsockopt(sk, level, name, val, &aux) < 0) {\n"
new = old + (
    "\t\t/* cove: passcred-eopnotsupp */\n"
    "\t\tif (errno == EOPNOTSUPP && level == SOL_SOCKET && (name == SO_PASSCRED || name == SO_PASSSEC) &&\n"
    "\t\t    len == sizeof(int)) {\n"
    "\t\t\t*(int *)val = 0;\n"
    "\t\t\treturn 0;\n"
    "\t\t}\n"
)
if src.count(old) != 1:
    sys.exit("do_dump_opt not found where expected")
open(path, "w").write(src.replace(old, new))
PY
fi

STEP="build (make criu)"
jobs="$(nproc 2>/dev/null || echo 2)"
log "building criu $upstream (make -j$jobs criu; log: $WORK/build.log)"
t0=$SECONDS
if ! make -C "$build" -j"$jobs" criu > "$WORK/build.log" 2>&1; then
  tail -n 30 "$WORK/build.log" >&2
  die "make failed; full log: $WORK/build.log (build tree kept in $build)"
fi
[ -x "$build/criu/criu" ] || die "make succeeded but $build/criu/criu is missing"
log "built in $((SECONDS - t0)) s"

# --- 5. install and check ----------------------------------------------------------------------------------
STEP="install $TARGET"
install -D -m 0755 "$build/criu/criu" "$TARGET.new"
v="$(criu_version "$TARGET.new")"
if ! version_ok "$v"; then rm -f "$TARGET.new"; die "built binary reports version '${v:-?}', expected >= $CRIU_MIN"; fi

STEP="criu check"
out="$("$TARGET.new" check 2>&1 || true)"
if ! grep -q "Looks good" <<<"$out"; then
  rm -f "$TARGET.new"
  printf '%s\n' "$out" >&2
  die "criu $v was built but 'criu check' does not say 'Looks good' on this machine; not installed"
fi
mv -f "$TARGET.new" "$TARGET"
touch "$TARGET.cove-$PATCH_ID"
rm -rf "$build" "$WORK/build.log"
log "installed criu $v as $TARGET ('criu check': Looks good)"
