"""Hessian-vector products, linear algebra and flatness measures. Imports
entropy_sgd.core and entropy_sgd.workloads."""
