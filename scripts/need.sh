# shellcheck shell=bash
# Sourced by the scripts that need system packages (test.sh, package.sh).
#
#   declare -A need=([command]=debian-package ...)
#   install_missing WHO need
#
# Installs the packages of the commands that are missing (as root), or says which to
# install and fails (otherwise). WHO names the script in the messages; the array may
# have any name but `wanted`, the name this function gives it.
install_missing() {
  local who=$1
  local -n wanted=$2
  local missing=() cmd pkgs
  for cmd in "${!wanted[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  if [ "$(id -u)" != 0 ]; then
    echo "$who: missing packages: $pkgs (run as root, or: sudo apt-get install $pkgs)" >&2
    return 1
  fi
  echo "$who: installing $pkgs" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # Debian 13 folded nginx-light into nginx.
  if [[ " $pkgs " == *" nginx-light "* ]] && ! apt-cache show nginx-light >/dev/null 2>&1; then
    pkgs=${pkgs/nginx-light/nginx}
  fi
  # shellcheck disable=SC2086 # one word per package
  apt-get install -y -qq $pkgs >/dev/null
}
