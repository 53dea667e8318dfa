"""The chained CNI plugin (``istio-cni``) and its node installer (``install-cni``)."""
