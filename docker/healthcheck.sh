#!/bin/bash
# diffusiond-healthcheck [PATH]: exits 0 when `GET PATH` (default /health) on the
# server's own port answers 200. The image's HEALTHCHECK; bash's /dev/tcp does the
# request, so the runtime image needs no curl. The port comes from DIFFUSIOND_BIND.
set -euo pipefail

path=${1:-/health}
bind=${DIFFUSIOND_BIND:-127.0.0.1:8080}
port=${bind##*:}
host=${bind%:*}
host=${host#[}
host=${host%]}
case $host in
    "" | 0.0.0.0) host=127.0.0.1 ;;
    ::) host=::1 ;;
esac

exec 3<>"/dev/tcp/$host/$port"
printf 'GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: diffusiond-healthcheck\r\nConnection: close\r\n\r\n' "$path" "$host" >&3
IFS= read -r -t 5 status <&3 || status=""
exec 3<&-
case $status in
    "HTTP/1."?" 200 "*) exit 0 ;;
    *) echo "GET $path: ${status:-no answer}" >&2; exit 1 ;;
esac
