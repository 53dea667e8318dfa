"""Traffic capture for an Istio-style mesh: plan the ISTIO_* iptables chains and install them."""
