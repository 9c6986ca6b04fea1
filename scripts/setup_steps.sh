# Sourced by setup_env.sh and setup_slicer_env.sh, after they set LOG: run the setup quietly, one line per step.
#
# step DESCRIPTION COMMAND...: prints "setup: DESCRIPTION ... ok" on stderr and appends the command's output to
# $LOG; when the command fails, prints the log's last lines and its path and exits 1.
step() {
  local what="$1"; shift
  printf 'setup: %s ... ' "$what" >&2
  printf '\n=== %s\n$ %s\n' "$what" "$*" >> "$LOG"
  local t0=$SECONDS
  if "$@" >> "$LOG" 2>&1; then
    echo "ok ($((SECONDS - t0)) s)" >&2
    return 0
  fi
  echo failed >&2
  # a pip config may name index folders that do not exist (this project's build machine does): pip warns about
  # each of them for every package, which would fill the tail
  grep -v "^WARNING: Location '.*' is ignored" "$LOG" | tail -n 20 | sed 's/^/  | /' >&2
  echo "setup: failed; the full output is in $LOG" >&2
  exit 1
}
