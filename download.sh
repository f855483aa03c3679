#!/usr/bin/env bash
# Download the Llama 2 weights and tokenizer from Meta with a presigned URL.
#
# Compatible with Meta's download.sh (same prompts, same folder layout), plus:
# non-interactive use, input validation, resumable downloads into FILE.part,
# md5 verification before a file gets its final name (md5sum, or md5 -r on
# macOS), detection of HTML/XML error pages saved in place of a file, and clear
# messages for expired links. Needs bash (3.2+), wget or curl, md5sum or md5.
# Run `./download.sh --help` for usage.

set -u
set -f  # no globbing: model names and URLs are split on commas only

ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"
REQUEST_PAGE="https://ai.meta.com/resources/models-and-libraries/llama-downloads/"

usage() {
    cat <<EOF
Usage: ./download.sh [--url URL] [--models LIST] [--target DIR] [--tool wget|curl] [--mirror]

Downloads Llama 2 from Meta. Request a download link at
  $REQUEST_PAGE
and copy the URL from Meta's e-mail: the whole link, starting with
  https://download.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=...

Options (each has an environment variable; options win):
  -u, --url URL        presigned URL from Meta's e-mail         (PRESIGNED_URL)
  -m, --models LIST    comma-separated models, or "all"         (MODEL_SIZE)
                       valid: $ALL_MODELS
  -t, --target DIR     where to put the files; default "."      (TARGET_FOLDER)
      --tool NAME      wget or curl; default wget if installed  (LLAMA_DOWNLOAD_TOOL)
      --mirror         accept a URL on another host or over plain http:// (LLAMA_DOWNLOAD_MIRROR=1);
                       without it only https:// links on *.llamameta.net are used
  -h, --help           show this help
The checksum tool can be forced with LLAMA_MD5_TOOL=md5sum|md5|openssl.

A missing URL or model list is asked for on standard input, as in Meta's script
(an empty answer to the model question means all models; end of input is an error).

Layout: DIR/{LICENSE,USE_POLICY.md,tokenizer.model,tokenizer_checklist.chk} and
DIR/llama-2-7b/{consolidated.00.pth,params.json,checklist.chk} (13B: 2 shards,
70B: 8 shards; chat models in llama-2-7b-chat etc.).

Files are downloaded to FILE.part (resumed if a run is interrupted) and renamed
to FILE once their md5 sum matches the checklist. A file that already matches is
skipped. Run the script again with the same or a new link to resume.

Examples:
  ./download.sh
  PRESIGNED_URL='https://download.llamameta.net/*?Policy=...' MODEL_SIZE=7B,7B-chat TARGET_FOLDER=weights ./download.sh
  ./download.sh --url 'https://download.llamameta.net/*?Policy=...' --models 13B-chat --target weights

Exit status: 0 if every requested file is present and verified, 1 on a download
or verification failure, 2 on a usage error.
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf 'download.sh: warning: %s\n' "$*" >&2; }
die() {
    printf 'download.sh: error: %s\n' "$*" >&2
    if [ -n "${FAILURES-}" ]; then printf '\ndownload.sh: earlier problems in this run:\n%s' "$FAILURES" >&2; fi
    exit 1
}
usage_error() { printf 'download.sh: error: %s\n' "$*" >&2; printf "Run './download.sh --help' for usage.\n" >&2; exit 2; }

FAILURES=""
fail() {
    printf 'download.sh: error: %s\n' "$*" >&2
    FAILURES="${FAILURES}  - $*
"
}

trap 'printf "\ndownload.sh: interrupted; partial downloads are kept as *.part; run the script again to resume.\n" >&2; exit 130' INT TERM

# ---------------------------------------------------------------- arguments

URL="${PRESIGNED_URL-}"
MODELS="${MODEL_SIZE-}"
MODELS_SET=0
if [ -n "${MODEL_SIZE+x}" ] && [ -n "$MODEL_SIZE" ]; then MODELS_SET=1; fi
TARGET="${TARGET_FOLDER:-.}"
TOOL="${LLAMA_DOWNLOAD_TOOL-}"
MIRROR="${LLAMA_DOWNLOAD_MIRROR:-0}"

need_value() {
    if [ "$2" -lt 2 ]; then usage_error "option $1 needs a value"; fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -u|--url) need_value "$1" $#; URL="$2"; shift 2 ;;
        --url=*) URL="${1#*=}"; shift ;;
        -m|--models|--model-size) need_value "$1" $#; MODELS="$2"; MODELS_SET=1; shift 2 ;;
        --models=*|--model-size=*) MODELS="${1#*=}"; MODELS_SET=1; shift ;;
        -t|--target) need_value "$1" $#; TARGET="$2"; shift 2 ;;
        --target=*) TARGET="${1#*=}"; shift ;;
        --tool) need_value "$1" $#; TOOL="$2"; shift 2 ;;
        --tool=*) TOOL="${1#*=}"; shift ;;
        --mirror) MIRROR=1; shift ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done

# ---------------------------------------------------------------- tools

if [ -n "$TOOL" ]; then
    case "$TOOL" in
        wget|curl) command -v "$TOOL" >/dev/null 2>&1 || die "$TOOL was requested (--tool / LLAMA_DOWNLOAD_TOOL) but is not installed" ;;
        *) usage_error "unknown download tool '$TOOL': use wget or curl" ;;
    esac
elif command -v wget >/dev/null 2>&1; then
    TOOL=wget
elif command -v curl >/dev/null 2>&1; then
    TOOL=curl
else
    die "neither wget nor curl is installed; install one of them (e.g. 'apt-get install wget' or 'brew install wget')"
fi

MD5_TOOL="${LLAMA_MD5_TOOL-}"
if [ -n "$MD5_TOOL" ]; then
    case "$MD5_TOOL" in
        md5sum|md5|openssl) command -v "$MD5_TOOL" >/dev/null 2>&1 || die "$MD5_TOOL was requested (LLAMA_MD5_TOOL) but is not installed" ;;
        *) usage_error "unknown checksum tool '$MD5_TOOL': use md5sum, md5 or openssl" ;;
    esac
elif command -v md5sum >/dev/null 2>&1; then
    MD5_TOOL=md5sum
elif command -v md5 >/dev/null 2>&1; then
    MD5_TOOL=md5          # macOS
elif command -v openssl >/dev/null 2>&1; then
    MD5_TOOL=openssl
else
    die "no md5 tool found: install coreutils (md5sum); on macOS md5 is built in"
fi

# md5 of a file as 32 lower-case hex digits (empty on failure).
md5_of() {
    local out
    case "$MD5_TOOL" in
        md5sum) out=$(md5sum < "$1") || return 1 ;;
        md5) out=$(md5 -r "$1") || return 1 ;;       # macOS: "<hash> <file>"
        openssl) out=$(openssl dgst -md5 -r < "$1") || return 1 ;;
    esac
    out="${out%% *}"
    case "$out" in *[A-F]*) out=$(printf '%s' "$out" | tr 'A-F' 'a-f') ;; esac
    case "$out" in
        *[!0-9a-f]*|"") return 1 ;;
    esac
    [ ${#out} -eq 32 ] || return 1
    printf '%s\n' "$out"
}

# ---------------------------------------------------------------- input

if [ -z "$URL" ]; then
    if ! read -r -p "Enter the URL from email: " URL; then
        [ -n "$URL" ] || usage_error "no URL given: pass --url URL or PRESIGNED_URL=URL, or type it when asked"
    fi
    echo ""
fi
if [ "$MODELS_SET" = 0 ]; then
    if ! read -r -p "Enter the list of models to download without spaces (${ALL_MODELS}), or press Enter for all: " MODELS; then
        [ -n "$MODELS" ] || usage_error "no model list given: pass --models 7B,7B-chat (or 'all') or MODEL_SIZE=..., or answer the question"
    fi
fi

# Strip spaces, quotes and <> that e-mail clients and shells add around links.
URL=$(printf '%s' "$URL" | tr -d ' \t\r\n')
URL="${URL#[\"\'<]}"
URL="${URL%[\"\'>]}"

COPY_HINT="copy the download URL from Meta's e-mail as text: the whole link that starts with https://download.llamameta.net/*?Policy= and ends after Key-Pair-Id=..., not the link target of a button (that can be a tracking redirect). If in doubt, request a new link at $REQUEST_PAGE"

check_url() {
    local u="$1" lower rest before after
    lower=$(printf '%s' "$u" | LC_ALL=C tr '[:upper:]' '[:lower:]')
    case "$lower" in
        https://*|http://*) ;;
        *) usage_error "the URL must start with https:// -- got '${u:0:60}'. Please $COPY_HINT" ;;
    esac
    rest="${lower#*://}"
    # The link carries signed credentials and the files are code we will load: only Meta's host, only over TLS,
    # unless the user vouches for a mirror. The host is what a client would connect to (after any user@).
    host="${rest%%[/?#]*}"
    host="${host##*@}"
    host="${host%%:*}"
    if [ "$MIRROR" != 1 ]; then
        case "$lower" in
            https://*) ;;
            *) usage_error "the URL starts with http://, which would send your signed link and receive the weights unencrypted; use Meta's https:// link (or pass --mirror for a mirror you trust). Please $COPY_HINT" ;;
        esac
        case "$host" in
            llamameta.net|*.llamameta.net) ;;
            *) usage_error "the URL's host is '$host', not Meta's download host (*.llamameta.net); pass --mirror to download from a mirror you trust. Please $COPY_HINT" ;;
        esac
    fi
    case "$rest" in
        *http://*|*https://*|*http%3a*|*https%3a*)
            usage_error "this is a redirect/tracking link (it has another URL inside it), not Meta's presigned download URL. Please $COPY_HINT" ;;
    esac
    case "$u" in
        *'*'*) ;;
        *)
            case "$lower" in
                *%2a*) usage_error "the URL's '*' placeholder is URL-encoded as %2A, so this is a copied redirect or an encoded link, not the presigned URL itself. Please $COPY_HINT" ;;
            esac
            usage_error "the URL has no '*' placeholder, so it is not Meta's presigned download URL (the script puts each file name in place of the '*'). Please $COPY_HINT" ;;
    esac
    before="${u%%\**}"
    after="${u#*\*}"
    case "$before" in
        *'?'*) usage_error "the '*' placeholder is in the query string, not in the path; this is not Meta's presigned download URL. Please $COPY_HINT" ;;
    esac
    case "$after" in
        *\??*) ;;
        *) usage_error "the URL has no query string after the '*' (?Policy=...&Signature=...&Key-Pair-Id=...); the link is cut short. Please $COPY_HINT" ;;
    esac
    case "$after" in
        *Signature=*) ;;
        *) warn "the URL's query string has no Signature=...; if downloads fail, check that you copied the whole link" ;;
    esac
}
check_url "$URL"

URL_PREFIX="${URL%%\**}"
URL_SUFFIX="${URL#*\*}"
url_for() { printf '%s%s%s' "$URL_PREFIX" "$1" "$URL_SUFFIX"; }

# Validate and normalise the model list before downloading anything.
MODELS=$(printf '%s' "$MODELS" | tr -d ' \t\r\n')
case "$(printf '%s' "$MODELS" | LC_ALL=C tr '[:upper:]' '[:lower:]')" in
    ""|all) MODELS="$ALL_MODELS" ;;
esac
MODEL_LIST=""
for m in $(printf '%s' "$MODELS" | tr ',' ' '); do
    key=$(printf '%s' "$m" | LC_ALL=C tr '[:lower:]' '[:upper:]')
    key="${key#LLAMA-2-}"
    case "$key" in
        7B|13B|70B) norm="$key" ;;
        7B-CHAT|13B-CHAT|70B-CHAT) norm="${key%-CHAT}-chat" ;;
        *) usage_error "unknown model '$m'. Valid models: ${ALL_MODELS} (comma-separated, or 'all')" ;;
    esac
    case ",$MODEL_LIST," in
        *",$norm,"*) ;;
        *) MODEL_LIST="${MODEL_LIST:+$MODEL_LIST,}$norm" ;;
    esac
done
[ -n "$MODEL_LIST" ] || usage_error "no model given. Valid models: ${ALL_MODELS}"

mkdir -p "$TARGET" || die "cannot create the target folder '$TARGET'"
[ -w "$TARGET" ] || die "the target folder '$TARGET' is not writable"

say "Downloading Llama 2 ($MODEL_LIST) into $TARGET with $TOOL; checksums with $MD5_TOOL"

# ---------------------------------------------------------------- helpers

# True if the file looks like an HTML/XML error page rather than the payload:
# it starts with "<" (after blanks or a BOM), or, for a small file, has an
# <Error>, <!DOCTYPE or <html tag in its first KiB. Weights, tokenizer and
# params.json never start with "<".
is_error_page() {
    local size
    [ -s "$1" ] || return 1
    size=$(wc -c < "$1") || return 1
    LC_ALL=C head -c 1024 "$1" 2>/dev/null | LC_ALL=C tr -d '\000' | LC_ALL=C awk -v size="$size" '
        { s = s tolower($0) "\n" }
        END {
            if (substr(s, 1, 3) == "\357\273\277") s = substr(s, 4)
            sub(/^[ \t\r\n]+/, "", s)
            if (substr(s, 1, 1) == "<") exit 0
            if (size + 0 < 1048576 && (index(s, "<error>") || index(s, "<!doctype") || index(s, "<html"))) exit 0
            exit 1
        }'
}

# A short description of an error page: its <Code> and <Message>, if any.
error_page_summary() {
    LC_ALL=C head -c 2048 "$1" 2>/dev/null | LC_ALL=C tr -d '\000\r\n' |
        LC_ALL=C sed -n -e 's/.*<Code>\([^<]*\)<\/Code>.*<Message>\([^<]*\)<\/Message>.*/\1: \2/p' \
                        -e 's/.*<title>\([^<]*\)<\/title>.*/\1/p' | head -n 1
}

remove_error_page() {  # file, remote name
    local what
    what=$(error_page_summary "$1")
    rm -f "$1"
    fail "the server sent an HTML/XML error page${what:+ ($what)} instead of $2; removed it ($1). The link may have expired: request a new one at $REQUEST_PAGE and run the script again"
}

# True if the file is a list of "<md5>  <name>" lines.
is_checklist() {
    [ -s "$1" ] || return 1
    LC_ALL=C awk '
        { sub(/\r$/, "") }
        /^[[:space:]]*$/ { next }
        $1 ~ /^[0-9a-fA-F]+$/ && length($1) == 32 && NF >= 2 { n++; next }
        { bad = 1 }
        END { exit (bad || n == 0) }' "$1"
}

# Expected md5 of NAME according to checklist CHK (empty if not listed).
expected_md5() {
    LC_ALL=C awk -v want="$2" '
        { sub(/\r$/, "") }
        NF >= 2 { n = $2; sub(/^\*/, "", n); sub(/^\.\//, "", n)
                  if (n == want) { print tolower($1); exit } }' "$1"
}

# Hide the signature: drop query strings from URLs in tool output.
redact() { LC_ALL=C sed -e 's/?[^ "]*/?.../g'; }

# The HTTP status mentioned in a wget log (last one), if any.
wget_status() {
    LC_ALL=C grep -Eo '(ERROR|response) [0-9]{3}' "$1" 2>/dev/null | tail -n 1 | LC_ALL=C grep -Eo '[0-9]{3}'
}

explain_status() {  # status, remote name
    case "$1" in
        403) die "HTTP 403 Forbidden for $2: the link expired or was used up: request a new one at $REQUEST_PAGE (links are valid for 24 hours and a limited number of downloads), then run the script again with the new URL; finished files are kept and partial ones resumed" ;;
        404) die "HTTP 404 Not Found for $2: the file is not at this URL. Check that you pasted Meta's presigned URL for Llama 2 unchanged (with the '*'); the models are: $ALL_MODELS" ;;
        401|400) die "HTTP $1 for $2: the server rejected the link; copy the whole URL again or request a new one at $REQUEST_PAGE" ;;
        "") return 0 ;;
        *) die "HTTP $1 for $2; partial data (if any) is kept as .part: run the script again to resume" ;;
    esac
}

exec 4>&1
TMPDIR_DL=$(mktemp -d 2>/dev/null || mktemp -d -t llamadl) || die "cannot create a temporary folder"
trap 'rm -rf "$TMPDIR_DL"' EXIT

# Download remote path $1 into $2 (resuming it if it exists). Exits on an
# HTTP error; returns 1 if the result is an error page (which is removed).
fetch() {
    local rel="$1" out="$2" url had=0 rc status log
    url=$(url_for "$rel")
    [ -e "$out" ] && had=1
    if [ "$had" = 1 ] && is_error_page "$out"; then
        say "removing $out: it is an HTML/XML error page from an earlier attempt, not data"
        rm -f "$out"
        had=0
    fi
    log="$TMPDIR_DL/log"
    : > "$log"
    status=""
    if [ "$TOOL" = wget ]; then
        if [ -t 2 ]; then
            # Interactive: show wget's progress bar, keep a copy to read the HTTP status.
            local progress="--progress=bar:force:noscroll"
            if wget --version 2>/dev/null | head -n 1 | grep -q 'Wget2'; then progress="--progress=bar"; fi
            wget --continue "$progress" -O "$out" "$url" 2>&1 1>&4 | tee "$log" >&2
            rc=${PIPESTATUS[0]}
        else
            # Logs (CI, nohup): no progress noise, and no signed URL unless something failed.
            wget --continue --no-verbose -O "$out" "$url" > "$log" 2>&1
            rc=$?
            if [ "$rc" != 0 ]; then redact < "$log" >&2; fi
        fi
        [ "$rc" = 0 ] || status=$(wget_status "$log")
    else
        local progress="-sS"
        [ -t 2 ] && progress="--progress-bar"
        status=$(curl "$progress" --fail --location --retry 3 --retry-delay 2 \
                      --continue-at - --output "$out" --write-out '%{http_code}' "$url")
        rc=$?
        # 416 on a resumed request: the file was already complete.
        if [ "$rc" != 0 ] && [ "$status" = 416 ] && [ "$had" = 1 ] && [ -s "$out" ]; then
            rc=0
        fi
        [ "$status" = 000 ] && status=""
    fi
    if [ "$rc" != 0 ]; then
        # Remove an empty file the tool itself created; keep any real partial data.
        if [ "$had" = 0 ] && [ -e "$out" ] && [ ! -s "$out" ]; then rm -f "$out"; fi
        explain_status "$status" "$rel"
        die "downloading $rel with $TOOL failed (exit status $rc). Check your network connection; partial data is kept as $out, run the script again to resume"
    fi
    if is_error_page "$out"; then
        remove_error_page "$out" "$rel"
        return 1
    fi
    if [ ! -s "$out" ]; then
        rm -f "$out"
        fail "the server sent an empty file for $rel"
        return 1
    fi
    return 0
}

# A file without a checksum (LICENSE, USE_POLICY.md): keep it if present.
get_plain() {  # remote path, local path
    local rel="$1" dest="$2"
    if [ -s "$dest" ] && ! is_error_page "$dest"; then
        say "keep $dest (already present)"
        return 0
    fi
    if [ -e "$dest" ] && is_error_page "$dest"; then
        say "removing $dest: it is an HTML/XML error page from an earlier attempt, not data"
        rm -f "$dest"
    fi
    fetch "$rel" "$dest.part" || return 1
    mv -f "$dest.part" "$dest" || die "cannot rename $dest.part to $dest"
    say "got  $dest"
}

# A checklist: keep a valid local one, else download it afresh.
get_checklist() {  # remote path, local path
    local rel="$1" dest="$2"
    if is_checklist "$dest"; then
        say "keep $dest (already present)"
        return 0
    fi
    if [ -e "$dest" ] && is_error_page "$dest"; then
        say "removing $dest: it is an HTML/XML error page from an earlier attempt, not data"
        rm -f "$dest"
    fi
    rm -f "$dest.part"
    fetch "$rel" "$dest.part" || return 1
    if ! is_checklist "$dest.part"; then
        rm -f "$dest.part"
        fail "$rel from the server is not a list of md5 sums; cannot verify the files it covers"
        return 1
    fi
    mv -f "$dest.part" "$dest" || die "cannot rename $dest.part to $dest"
    say "got  $dest"
}

# A file covered by checklist CHK: skip it if it already verifies, otherwise
# download (resuming FILE.part) and rename to FILE only if the md5 matches.
get_verified() {  # remote path, local path, checklist
    local rel="$1" dest="$2" chk="$3" name want got
    name="${rel##*/}"
    want=$(expected_md5 "$chk" "$name")
    if [ -z "$want" ]; then
        warn "$name is not listed in $chk; it is downloaded without verification"
        get_plain "$rel" "$dest"
        return
    fi
    if [ -e "$dest" ]; then
        if is_error_page "$dest"; then
            say "removing $dest: it is an HTML/XML error page from an earlier attempt, not data"
            rm -f "$dest"
        else
            say "checking $dest ..."
            got=$(md5_of "$dest") || die "cannot compute the md5 sum of $dest with $MD5_TOOL"
            if [ "$got" = "$want" ]; then
                say "ok   $dest (already downloaded, md5 verified)"
                return 0
            fi
            if [ ! -e "$dest.part" ]; then
                say "$dest does not match $chk (an interrupted download?); resuming it as $dest.part"
                mv "$dest" "$dest.part" || die "cannot rename $dest to $dest.part"
            else
                say "$dest does not match $chk; resuming $dest.part instead"
            fi
        fi
    fi
    fetch "$rel" "$dest.part" || return 1
    got=$(md5_of "$dest.part") || die "cannot compute the md5 sum of $dest.part with $MD5_TOOL"
    if [ "$got" != "$want" ]; then
        fail "checksum mismatch for $dest: md5 $got, expected $want (from $chk). The download is kept as $dest.part; delete it and run the script again to download it afresh"
        return 1
    fi
    mv -f "$dest.part" "$dest" || die "cannot rename $dest.part to $dest"
    say "ok   $dest (md5 verified)"
}

# ---------------------------------------------------------------- downloads

get_plain "LICENSE" "$TARGET/LICENSE"
get_plain "USE_POLICY.md" "$TARGET/USE_POLICY.md"
if get_checklist "tokenizer_checklist.chk" "$TARGET/tokenizer_checklist.chk"; then
    get_verified "tokenizer.model" "$TARGET/tokenizer.model" "$TARGET/tokenizer_checklist.chk"
fi

for m in $(printf '%s' "$MODEL_LIST" | tr ',' ' '); do
    case "$m" in
        7B|7B-chat) shards=1 ;;
        13B|13B-chat) shards=2 ;;
        70B|70B-chat) shards=8 ;;
    esac
    folder="llama-2-$(printf '%s' "$m" | LC_ALL=C tr '[:upper:]' '[:lower:]')"
    dir="$TARGET/$folder"
    say "== $m ($folder, $shards shard(s))"
    mkdir -p "$dir" || die "cannot create $dir"
    if ! get_checklist "$folder/checklist.chk" "$dir/checklist.chk"; then
        fail "skipped $m: no valid checklist"
        continue
    fi
    s=0
    while [ "$s" -lt "$shards" ]; do
        shard=$(printf 'consolidated.%02d.pth' "$s")
        get_verified "$folder/$shard" "$dir/$shard" "$dir/checklist.chk"
        s=$((s + 1))
    done
    get_verified "$folder/params.json" "$dir/params.json" "$dir/checklist.chk"
done

if [ -n "$FAILURES" ]; then
    printf '\ndownload.sh: FAILED. Problems:\n%s' "$FAILURES" >&2
    exit 1
fi
say ""
say "All requested files are in $TARGET and their checksums match."
