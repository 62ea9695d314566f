# Least-privilege Consul ACL policy for a subsys node.
#
#   consul acl policy create -name subsys -rules @consul/subsys-policy.hcl
#   consul acl token create -description "subsys on <node>" -policy-name subsys
#
# Checked against the ACL checks in the Consul v1.16.3 source (agent/acl.go,
# agent/agent_endpoint.go, agent/consul/{kvs,session,catalog}_endpoint.go)
# and exercised against a real agent with default_policy = "deny".
# "write" always implies "read" for the same resource.
#
# Not granted on purpose: node write (registering/changing the node itself
# is the job of the agent's own token), key access outside subsys/, acl,
# operator, keyring, event, query, mesh/intentions.

# KV: subsys keeps all of its state, including lock keys, under subsys/.
# Writing a key, and taking or releasing a lock on it (PUT ?acquire= /
# ?release=), needs key:write on that key; reads and blocking queries
# (watches) need key:read, implied by write.
key_prefix "subsys/" {
  policy = "write"
}

# Sessions: a lock is held through a session, and creating, renewing and
# destroying a session needs session:write on the NAME OF THE NODE the
# session is attached to (the local agent's node by default). Node names
# differ from host to host, so the prefix is empty; a deployment that
# issues one token per host can narrow it to  session "<node-name>" { ... }.
# Listing/reading sessions needs session:read, implied.
session_prefix "" {
  policy = "write"
}

# Services: registering a service through the local agent
# (PUT /v1/agent/service/register), deregistering it, registering its TTL
# check and passing/warning/failing that check (PUT /v1/agent/check/pass/...)
# all need service:write on the service's name. subsys only registers
# services whose names start with "subsys". Discovering the other subsys
# instances (/v1/health/service/subsys..., /v1/catalog/service/...) needs
# service:read, implied.
service_prefix "subsys" {
  policy = "write"
}

# Nodes: health and catalog results about a service are filtered by node:read
# as well as service:read, so without this a node would not see its peers.
# Read only: see above for why not write.
node_prefix "" {
  policy = "read"
}

# Agent: GET /v1/agent/self (learning the local node name and datacenter,
# e.g. to attach sessions to it) needs agent:read on the local node's name.
# Read only: agent:write would allow join/leave/reload/token changes.
agent_prefix "" {
  policy = "read"
}
