"""The Consul coordinator: the key layout (:mod:`.keys`), the client adapter over
py-consul (:mod:`.client`) and the coordinator itself (:mod:`.coordinator`)."""
