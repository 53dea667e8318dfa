"""The pod-start benchmark behind ``scripts/bench``: a reference floor, the CNI ADD, the init
container, the per-rule way, concurrency and scale, all measured in one run on one machine."""
