"""Hessian-vector products, linear algebra and flatness measures. May import
entropy_sgd.core and entropy_sgd.workloads (today it needs only core)."""
