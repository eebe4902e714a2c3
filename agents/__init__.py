"""pilotfish: Docker service discovery through etcd and HAProxy's runtime API."""

__version__ = "0.1.0"
