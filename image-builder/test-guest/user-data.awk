# The cloud-config subset of ARCHITECTURE.md's "Seed contract", turned into records for /init:
#   W <US> path <US> permissions <US> owner <US> encoding <US> content   (one per write_files item)
#   P <US> mode                                                          (power_state)
# and each runcmd item, unquoted, into its own file dir/runcmd.N. Unknown keys are ignored.
function unq(s) {
  if (s ~ /^'.*'$/) { s = substr(s, 2, length(s) - 2); gsub(/''/, "'", s); return s }
  if (s ~ /^".*"$/) { return substr(s, 2, length(s) - 2) }
  return s
}
function flush() {
  if (have) printf "W\037%s\037%s\037%s\037%s\037%s\n", f["path"], f["permissions"], f["owner"], f["encoding"], f["content"]
  have = 0; split("", f)
}
BEGIN { section = ""; n = 0; have = 0 }
{ sub(/\r$/, "") }
/^#/ || /^[ \t]*$/ { next }
/^[^ -]/ {
  flush()
  section = $0; sub(/:.*/, "", section)
  next
}
section == "write_files" {
  line = $0
  if (line ~ /^ *- /) { flush(); have = 1; sub(/^ *- /, "", line) } else { sub(/^ +/, "", line) }
  key = line; sub(/:.*/, "", key)
  val = line; sub(/^[^:]*: */, "", val)
  f[key] = unq(val)
  next
}
section == "runcmd" && /^ *- / {
  line = $0; sub(/^ *- /, "", line)
  n++; out = dir "/runcmd." n
  print unq(line) > out; close(out)
  next
}
section == "power_state" && /^ +mode:/ {
  val = $0; sub(/^ +mode: */, "", val)
  printf "P\037%s\n", unq(val)
  next
}
END { flush() }
