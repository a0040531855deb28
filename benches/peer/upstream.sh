# Sourced by the bench scripts (from the repository root): starts the upstream nginx
# of benches/peer/upstream-nginx.conf on CPU 1 unless one already answers on 19001.
# $started_upstream is the PID of the one started here, or empty.
started_upstream=""
if ! (exec 3<>/dev/tcp/127.0.0.1/19001) 2>/dev/null; then
  taskset -c 1 nginx -c "$PWD/benches/peer/upstream-nginx.conf" &
  started_upstream=$!
  sleep 0.5
fi
