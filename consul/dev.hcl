# Loopback-only single-node Consul agent for development and tests.
#
# Usage (binary from consul/install.sh):
#   consul agent -dev -config-file consul/dev.hcl
#
# -dev already makes this an in-memory server that bootstraps itself and
# elects itself leader within a second or two; nothing is written to disk.
# This file only pins everything to 127.0.0.1 and switches off what subsys
# does not use (UI, DNS, gRPC/xDS, WAN gossip, Connect, peering).
#
# Ports. The `ports` block has these fields (Consul 1.16):
#   http      HTTP API                        (default 8500)   <- what subsys talks to
#   server    server RPC / Raft, TCP          (default 8300)   must be > 0
#   serf_lan  LAN gossip, TCP+UDP             (default 8301)   must be > 0
#   serf_wan  WAN gossip, TCP+UDP             (default 8302)   -1 disables
#   dns       DNS interface, TCP+UDP          (default 8600)   -1 disables
#   grpc      gRPC (xDS for Envoy)            (-dev: 8502)     -1 disables
#   grpc_tls  gRPC over TLS                   (server: 8503)   -1 disables
#   https     HTTPS API                       (default -1, off)
# So with the -1s below an agent needs exactly three free ports: http,
# server and serf_lan. The defaults below are the standard ones, for a
# developer running one agent by hand. A test fixture that runs agents in
# parallel must pick three free ports and override them on the command line,
# which takes precedence over this file:
#   consul agent -dev -config-file consul/dev.hcl \
#     -http-port=$HTTP -server-port=$SERVER -serf-lan-port=$SERF_LAN
# (equivalent flags for the others: -dns-port, -serf-wan-port, -grpc-port,
# -grpc-tls-port, -https-port.)

node_name = "subsys-dev"

bind_addr      = "127.0.0.1" # server RPC + gossip
client_addr    = "127.0.0.1" # HTTP (and DNS/gRPC, were they enabled)
advertise_addr = "127.0.0.1"

ports {
  http     = 8500
  server   = 8300
  serf_lan = 8301
  serf_wan = -1
  dns      = -1
  grpc     = -1
  grpc_tls = -1
}

ui_config {
  enabled = false
}

connect {
  enabled = false
}

peering {
  enabled = false
}

# No phoning home to checkpoint-api.hashicorp.com (there is no network anyway).
disable_update_check = true

# -dev turns the debug endpoints on and logs at DEBUG; keep them quiet.
enable_debug = false
log_level    = "INFO"

# Never run scripts for health checks; subsys uses TTL checks.
enable_script_checks       = false
enable_local_script_checks = false

# ACLs are off for the dev agent. To try consul/subsys-policy.hcl locally, add:
#   acl {
#     enabled        = true
#     default_policy = "deny"
#     tokens { initial_management = "<a uuid>" }
#   }
