"""Deployment files: the HAProxy configurations generated from sortformer_triton/proxy.py, the Kubernetes tree."""
