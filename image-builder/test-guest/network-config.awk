# network-config v2 (the shape of ARCHITECTURE.md's "Seed contract") → lines for /init:
#   mac M | name N | addr A/P | route TO VIA | dns D
function unq(s) {
  if (s ~ /^'.*'$/ || s ~ /^".*"$/) return substr(s, 2, length(s) - 2)
  return s
}
{ sub(/\r$/, "") }
/^[ \t]*#/ || /^[ \t]*$/ { next }
{
  match($0, /^ */); ind = RLENGTH
  t = substr($0, ind + 1)
  if (inns && ind <= nsind && t !~ /^- /) inns = 0
}
t ~ /^- / {
  item = substr(t, 3)
  if (list == "addresses") { print (inns ? "dns " : "addr ") unq(item) }
  else if (list == "routes" && item ~ /^to:/) { to = item; sub(/^to: */, "", to); to = unq(to) }
  next
}
{
  key = t; sub(/:.*/, "", key)
  val = t; sub(/^[^:]*: */, "", val); val = unq(val)
  if (key == "nameservers") { inns = 1; nsind = ind }
  if (key == "addresses" || key == "routes") list = key
  else if (key != "via" && key != "to") list = ""
  if (key == "macaddress") print "mac " val
  if (key == "set-name") print "name " val
  if (key == "to") to = val
  if (key == "via") print "route " to " " val
}
