# Shared by the launch scripts (sourced, not run).

# shq VALUE: VALUE as one word for any POSIX shell: single quotes around it, each ' inside
# written as '\''. Spaces, quotes, ;, $(...), backslashes and newlines arrive unchanged.
shq() {
  local s=${1//\'/\'\\\'\'}
  printf "'%s'" "$s"
}

# need_match NAME VALUE REGEX WHAT: exit 2 unless VALUE matches REGEX.
need_match() {
  [[ $2 =~ $3 ]] || { echo "$(basename "$0"): --$1=$2: expected $4" >&2; exit 2; }
}

# jax_pin: "==<version>" of the jax installed here, so remote hosts run the same version.
jax_pin() {
  local v=${JAX_VERSION:-$("${PYTHON:-python3}" -c 'import jax; print(jax.__version__)' 2>/dev/null)}
  [[ $v =~ ^[0-9]+(\.[0-9]+)*$ ]] || {
    echo "$(basename "$0"): cannot tell which jax to install remotely: install jax here, or set JAX_VERSION=x.y.z" >&2
    exit 2
  }
  printf '==%s' "$v"
}

# usage_and_exit_if_help ARGS...: with -h or --help among ARGS, prints the comment block at
# the top of the calling script (its usage) and exits 0.
usage_and_exit_if_help() {
  local arg
  for arg in "$@"; do
    if [[ $arg == --help || $arg == -h ]]; then
      echo "usage: launch/$(basename "$0")"
      sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
      exit 0
    fi
  done
}
