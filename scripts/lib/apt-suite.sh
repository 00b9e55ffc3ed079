# shellcheck shell=bash
# Helpers shared by scripts/ensure-compose and scripts/build-base-image.
#
# The Debian mirror is never hard-coded: it is read at run time from the
# host's own apt configuration (one-line *.list files and deb822 *.sources
# files), so the same scripts work behind whatever mirror the machine uses.
#
# Functions:
#   host_debian_mirror main|security
#                        -> prints "URI KEYRING" (KEYRING may be "-")
#   tmp_apt_init DIR SUITE [SUITE...]
#                        -> writes a private apt config for the given
#                           suites under DIR and runs `apt-get update` on it
#                           without touching the host's apt state
#   tmp_apt DIR CMD ARGS -> runs apt-get/apt-cache CMD against that config

# Print every usable "deb" entry of the host's apt configuration as
# "uri<TAB>suites<TAB>components<TAB>keyring" (keyring "-" when none).
# deb-src and "Enabled: no" entries are skipped; files are read the way apt
# reads them (sources.list, sources.list.d/*.list, sources.list.d/*.sources).
_host_apt_entries() {
    local files=() f
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    ((${#files[@]})) || { echo "no apt sources found on this host" >&2; return 1; }
    for f in "${files[@]}"; do
        if [[ $f == *.sources ]]; then
            # deb822: stanzas separated by blank lines; '#' starts a comment line.
            awk '
                function flush() {
                    if (types ~ /(^| )deb( |$)/ && enabled != "no" && uris != "") {
                        n = split(uris, u, " ")
                        for (i = 1; i <= n; i++)
                            printf "%s\t%s\t%s\t%s\n", u[i], suites, comps, (key ~ /^\// ? key : "-")
                    }
                    types = uris = suites = comps = key = enabled = ""
                }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[ \t]/ { next }   # continuation line (e.g. an inline Signed-By key)
                {
                    k = $0; sub(/:.*/, "", k); k = tolower(k)
                    v = $0; sub(/^[^:]*:[ \t]*/, "", v); gsub(/[ \t]+/, " ", v); sub(/ $/, "", v)
                    if (k == "types") types = v; else if (k == "uris") uris = v
                    else if (k == "suites") suites = v; else if (k == "components") comps = v
                    else if (k == "signed-by") key = v; else if (k == "enabled") enabled = tolower(v)
                }
                END { flush() }' "$f"
        else
            # one-line format: deb [opt=val ...] uri suite component...
            awk '
                /^[ \t]*deb[ \t]/ {
                    sub(/#.*/, ""); key = "-"
                    if (match($0, /\[[^]]*\]/)) {
                        bs = RSTART; bl = RLENGTH
                        opts = substr($0, bs + 1, bl - 2)
                        if (match(opts, /signed-by=[^ ]+/)) key = substr(opts, RSTART + 10, RLENGTH - 10)
                        $0 = substr($0, 1, bs - 1) substr($0, bs + bl)
                    }
                    comps = ""; for (i = 4; i <= NF; i++) comps = comps (i > 4 ? " " : "") $i
                    printf "%s\t%s\t%s\t%s\n", $2, $3, comps, key
                }' "$f"
        fi
    done
}

# host_debian_mirror main|security
# Print "URI KEYRING" of the host's Debian mirror: the entry that carries the
# host's own codename (main) or "<codename>-security" (security) and
# component main.  Without an exact match, the first non-security entry with
# main is used for the main archive; for security nothing is printed and the
# function returns 1.
host_debian_mirror() {
    local want=${1:-} codename entries uri suites comps key best=""
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    entries=$(_host_apt_entries) || return 1
    while IFS=$'\t' read -r uri suites comps key; do
        [[ -n $uri && " $comps " == *" main "* ]] || continue
        if [[ $want == security ]]; then
            if [[ -n $codename && " $suites " == *" $codename-security "* ]]; then
                echo "${uri%/} $key"; return 0
            fi
            continue
        fi
        [[ " $suites " == *-security* ]] && continue
        if [[ -n $codename && " $suites " == *" $codename "* ]]; then
            echo "${uri%/} $key"; return 0
        fi
        [[ -z $best ]] && best="${uri%/} $key"
    done <<<"$entries"
    [[ -n $best ]] && { echo "$best"; return 0; }
    [[ $want == security ]] || echo "no usable Debian mirror in the host apt configuration" >&2
    return 1
}

# Options that redirect every piece of apt state into DIR.
_tmp_apt_opts() {
    local d=$1
    printf '%s\n' \
        -o "Dir::Etc::SourceList=$d/sources.list" \
        -o "Dir::Etc::SourceParts=$d/sources.list.d" \
        -o "Dir::Etc::Preferences=$d/preferences" \
        -o "Dir::Etc::PreferencesParts=$d/preferences.d" \
        -o "Dir::State::Lists=$d/lists" \
        -o "Dir::Cache=$d/cache" \
        -o "Dir::Cache::pkgcache=" \
        -o "Dir::Cache::srcpkgcache=" \
        -o "Acquire::Languages=none" \
        -o "APT::Sandbox::User=root" \
        -o "APT::Get::List-Cleanup=false"
}

tmp_apt_init() {
    local d=$1; shift
    local mirror key opt=""
    read -r mirror key < <(host_debian_mirror main)
    [[ $key != "-" ]] && opt="[signed-by=$key] "
    mkdir -p "$d/sources.list.d" "$d/preferences.d" "$d/lists/partial" "$d/cache/archives/partial"
    : >"$d/preferences"
    : >"$d/sources.list"
    local s
    for s in "$@"; do echo "deb ${opt}${mirror} $s main" >>"$d/sources.list"; done
    local opts; mapfile -t opts < <(_tmp_apt_opts "$d")
    apt-get "${opts[@]}" -qq update >"$d/update.log" 2>&1 || { cat "$d/update.log" >&2; return 1; }
}

tmp_apt() {
    local d=$1 tool=$2; shift 2
    local opts; mapfile -t opts < <(_tmp_apt_opts "$d")
    "$tool" "${opts[@]}" "$@"
}
