"""Algorithm 1, the Langevin noise, the Sonnet optimizers, the compiled train
step and the Keras optimizer. Imports no other layer of entropy_sgd."""
