"""What the tests and the benchmark share: a PKI, the HTTPS Kubernetes API server, Pod objects,
kubeconfigs, network namespaces, the traffic topology and running the CNI plugin as a runtime
does. Imported as ``tests.support.<module>`` from tests/ and bench/ alike (the repository root is
on the path: pytest's ``pythonpath``, scripts/bench's own insertion); not shipped."""

if __name__ != "tests.support":  # pragma: no cover - a second copy of every module otherwise
    raise ImportError(f"import this package as tests.support, not as {__name__}")
