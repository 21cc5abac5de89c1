#!/usr/bin/env bash
# Keeps vendor/<crate> equal to the pinned upstream release plus the patches in
# vendor/patches/<crate>/ (applied in file-name order), plus its CAUSEWAY.md.
#
#   vendor/update.sh check [CRATE...]   fail, with the difference, if vendor/<crate> is not
#                                       pristine + patches (CI runs this)
#   vendor/update.sh apply [CRATE...]   rewrite vendor/<crate> as pristine + patches
#   vendor/update.sh pristine CRATE DIR [N]
#                                       write the pristine release, with its first N patches
#                                       applied (default 0), into DIR, to write or rework a
#                                       patch (see vendor/README.md)
#
# With no CRATE, check and apply do every crate below. The pristine source is the crate file
# published on crates.io, verified against the sha256 pinned below (the checksum Cargo.lock
# records for that release). It is taken from $VENDOR_CRATE_CACHE/<name>-<version>.crate if
# that is set and holds it, else from cargo's own download cache, else cargo downloads it
# (`cargo fetch` in a throwaway project that depends on exactly that release).
set -euo pipefail
shopt -s inherit_errexit

# crate version sha256-of-the-.crate-file
PINS=(
  "quinn 0.11.12 4051e23e9185c255a7e33ef59cdbca87a22d359052eecd22fc6b901fb37d9d11"
  "quinn-proto 0.11.19 0e750cca55fe4f0439a15d0bb529da9651e79993e8e72c61a899a36d462befbe"
)

VENDOR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

die() {
  echo "vendor/update.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# pin CRATE: sets VERSION and SHA256
pin() {
  local p name
  for p in "${PINS[@]}"; do
    read -r name VERSION SHA256 <<<"$p"
    [[ $name == "$1" ]] && return 0
  done
  die "no pinned release for '$1' (known: $(printf '%s ' "${PINS[@]%% *}"))"
}

sha256_of() {
  sha256sum "$1" | cut -d' ' -f1
}

# crate_file CRATE: prints the path of a verified <crate>-<version>.crate
crate_file() {
  local name=$1 file="$1-$VERSION.crate" f
  local cargo_home=${CARGO_HOME:-$HOME/.cargo}
  local candidates=()
  [[ -n ${VENDOR_CRATE_CACHE:-} ]] && candidates+=("$VENDOR_CRATE_CACHE/$file")
  for f in "$cargo_home"/registry/cache/*/"$file"; do candidates+=("$f"); done
  for f in "${candidates[@]}"; do
    if [[ -f $f && $(sha256_of "$f") == "$SHA256" ]]; then
      echo "$f"
      return 0
    fi
  done
  # Not cached: have cargo download it, through whatever registry setup cargo has here.
  local proj="$TMP/fetch-$name"
  mkdir -p "$proj/src"
  : >"$proj/src/lib.rs"
  cat >"$proj/Cargo.toml" <<EOF
[package]
name = "causeway-vendor-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
$name = { version = "=$VERSION", default-features = false }

[workspace]
EOF
  local host
  host=$(rustc -vV | sed -n 's/^host: //p')
  echo "vendor/update.sh: downloading $name $VERSION with cargo" >&2
  (cd "$proj" && cargo fetch --quiet --target "$host") >&2 ||
    die "cargo could not download $name $VERSION"
  for f in "$cargo_home"/registry/cache/*/"$file"; do
    if [[ -f $f ]]; then
      [[ $(sha256_of "$f") == "$SHA256" ]] ||
        die "$f has sha256 $(sha256_of "$f"), the pin in vendor/update.sh is $SHA256"
      echo "$f"
      return 0
    fi
  done
  die "cargo fetched $name $VERSION but $file is not in $cargo_home/registry/cache"
}

# patches CRATE: the crate's patch files, in order
patches() {
  local dir="$VENDOR/patches/$1"
  [[ -d $dir ]] || return 0
  find "$dir" -maxdepth 1 -name '*.patch' | LC_ALL=C sort
}

# build CRATE DIR [N]: pristine release plus its first N patches (all if N is empty) in DIR
build() {
  local name=$1 dest=$2 limit=${3:-} crate n=0 p
  pin "$name"
  crate=$(crate_file "$name")
  mkdir -p "$TMP/x-$name"
  tar -xzf "$crate" -C "$TMP/x-$name"
  [[ -d $TMP/x-$name/$name-$VERSION ]] || die "$crate does not unpack to $name-$VERSION/"
  mkdir -p "$(dirname "$dest")"
  mv "$TMP/x-$name/$name-$VERSION" "$dest"
  rmdir "$TMP/x-$name"
  while read -r p; do
    [[ -n $p ]] || continue
    [[ -n $limit ]] && ((n >= limit)) && break
    n=$((n + 1))
    # git apply outside any repository (no fuzz, paths relative to the crate root);
    # GIT_CEILING_DIRECTORIES keeps it from finding a repository above DIR.
    (cd "$dest" && unset GIT_DIR GIT_WORK_TREE &&
      GIT_CEILING_DIRECTORIES=$(dirname "$PWD") git apply --whitespace=nowarn "$p") ||
      die "${p#"$VENDOR"/} does not apply to $name $VERSION (+ the patches before it)"
  done < <(patches "$name")
  if [[ -n $limit ]] && ((n < limit)); then
    die "$name has only $n patches"
  fi
  return 0
}

# expected CRATE: prints a directory holding what vendor/CRATE must be
expected() {
  local name=$1 dir="$TMP/expected/$1"
  build "$name" "$dir"
  [[ -f $VENDOR/$name/CAUSEWAY.md ]] || die "vendor/$name/CAUSEWAY.md is missing"
  cp "$VENDOR/$name/CAUSEWAY.md" "$dir/"
  echo "$dir"
}

check() {
  local name=$1 dir
  pin "$name"
  dir=$(expected "$name")
  # A target/ left by running the crate's tests in place is not part of the copy.
  if ! diff -ruN --exclude=target "$dir" "$VENDOR/$name" >"$TMP/diff-$name"; then
    sed -e "s#$TMP/expected/$name#pristine+patches#g" -e "s#$VENDOR/#vendor/#g" \
      -e '/^\(---\|+++\) /s/\t.*//' "$TMP/diff-$name"
    echo >&2
    diff -rq --exclude=target "$dir" "$VENDOR/$name" |
      sed -e "s#$TMP/expected/$name#pristine+patches#g" -e "s#$VENDOR/#vendor/#g" >&2 || true
    echo "vendor/update.sh: vendor/$name differs from $name $VERSION + vendor/patches/$name/*.patch" >&2
    echo "  (diff above: pristine+patches -> vendor/$name). Turn the change into a patch, or run" >&2
    echo "  'vendor/update.sh apply $name' to drop it; see vendor/README.md." >&2
    return 1
  fi
  echo "vendor/$name = $name $VERSION + $(patches "$name" | wc -l) patches: ok"
}

apply() {
  local name=$1 dir
  pin "$name"
  dir=$(expected "$name")
  mkdir -p "$VENDOR/$name"
  find "$VENDOR/$name" -mindepth 1 -maxdepth 1 ! -name target -exec rm -rf {} +
  cp -a "$dir/." "$VENDOR/$name/"
  echo "vendor/$name rewritten as $name $VERSION + $(patches "$name" | wc -l) patches"
}

all_crates() {
  local p
  for p in "${PINS[@]}"; do echo "${p%% *}"; done
}

cmd=${1:-}
[[ -n $cmd ]] || usage
shift
case $cmd in
  check | apply)
    if (($# == 1)); then
      "$cmd" "$1"
      exit 0
    fi
    crates=("$@")
    ((${#crates[@]})) || mapfile -t crates < <(all_crates)
    # One run per crate, so that one crate's failure still lets the others be checked.
    status=0
    for c in "${crates[@]}"; do bash "${BASH_SOURCE[0]}" "$cmd" "$c" || status=1; done
    exit $status
    ;;
  pristine)
    (($# == 2 || $# == 3)) || usage
    [[ ! -e $2 ]] || die "$2 already exists"
    build "$1" "$TMP/out" "${3:-0}"
    mkdir -p "$(dirname "$2")"
    mv "$TMP/out" "$2"
    echo "$2: $1 $VERSION + its first ${3:-0} patches"
    ;;
  *) usage ;;
esac
