"""The models (the paper's nets, All-CNN, Wide ResNets) and the input
pipelines. Imports only entropy_sgd.core."""
