"""The Entropy-SGD paper's networks as Sonnet 2 modules, and the model names.

Chaudhari et al. (ICLR 2017) Sec. 5 train four networks; their code
(ucla-vision/entropy-sgd, `models.lua`, `python/models.py`) defines them:

* `MnistFC` ("mnistfc"): 784-1024-1024-10 with BatchNorm and ReLU; dropout 0.2
  on the input and `dropout` (0.5) after each hidden layer.
* `LeNet` ("lenet", the reference's "mnistconv"):
  conv 20 5x5 -> BN -> ReLU -> max-pool 3 -> dropout,
  conv 50 5x5 -> BN -> ReLU -> max-pool 2 -> dropout,
  fc 500 -> BN -> ReLU -> dropout, fc 10.
* `AllCNN` ("allcnn", the paper's All-CNN-BN, the reference's "cifarconv"):
  All-CNN-C of Springenberg et al. (2015) with BatchNorm, as the reference
  builds it (see the class docstring for where that differs from All-CNN-C).
* `wide_resnet.WideResNet` ("wrn-DEPTH-WIDTH").

Differences from the reference, all without effect on the function computed:
linear and convolution layers followed by BatchNorm have no bias (BatchNorm
subtracts it again, so its gradient is identically zero); the reference's
layers have one. So our parameter counts are the reference's minus those
biases (`reference_parameter_count` gives theirs). Initialisation is He-normal
(fan-in) for layers before a ReLU and Glorot for the logits layer; the
reference uses Torch's default uniform initialisation.

Every module is called as `model(images, is_training)` with NHWC float
images and returns logits; `is_training` is a Python bool that switches
BatchNorm statistics and dropout. With `compute_dtype` (bfloat16 or
float16) a module casts the images to it, computes in 16 bits over float32
variables and returns float32 logits (see `precision`).

Dropout in the paper's nets is stateless: the masks of the k-th training call
are keyed by (seed, k, layer), and k is a variable that checkpoints save, so
a resumed run draws the masks an uninterrupted one would. `use_dropout=False`
turns dropout off in a training-mode call, as the reference does when it
recomputes the BatchNorm statistics before testing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import sonnet as snt
import tensorflow as tf

from entropy_sgd.core import precision
from entropy_sgd.workloads import dropout as dropout_lib
from entropy_sgd.workloads import wide_resnet

Shape = Tuple[int, int, int]
MNIST_SHAPE: Shape = (28, 28, 1)
CIFAR_SHAPE: Shape = (32, 32, 3)


def _he_normal() -> snt.initializers.Initializer:
  return snt.initializers.VarianceScaling(2.0, "fan_in", "truncated_normal")


INITIALISATIONS = ("he", "torch")


class _TorchDefault:
  """Torch7's default `reset()` of nn.Linear and nn.SpatialConvolution.

  Weights and biases ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in)), fan_in = inputs
  (Linear) or kh * kw * input channels (convolution). Sonnet creates a layer's
  weights before its bias, so `weights` records fan_in for `bias`. One
  instance per layer.
  """

  def __init__(self):
    self._bound = None

  def weights(self, shape, dtype):
    fan_in = 1
    for size in shape[:-1]:
      fan_in *= int(size)
    self._bound = 1.0 / fan_in**0.5
    return tf.random.uniform(shape, -self._bound, self._bound, dtype)

  def bias(self, shape, dtype):
    if self._bound is None:
      raise RuntimeError("Torch-default bias created before its weights.")
    return tf.random.uniform(shape, -self._bound, self._bound, dtype)


def _layer_init(init: str, before_relu: bool = True) -> dict:
  """`w_init` (and `b_init`) of one linear or convolution layer."""
  if init == "torch":
    torch_default = _TorchDefault()
    return dict(w_init=torch_default.weights, b_init=torch_default.bias)
  if init != "he":
    raise ValueError(f"init must be one of {INITIALISATIONS}; got {init!r}")
  # Glorot (Sonnet's default) for the logits layer.
  return dict(w_init=_he_normal()) if before_relu else {}


def _batch_norm(name: str, init: str = "he") -> snt.BatchNorm:
  # Torch7's nn.BatchNormalization `reset()`: scale ~ U(0, 1), offset 0.
  scale_init = (snt.initializers.RandomUniform(0.0, 1.0) if init == "torch"
                else None)
  return precision.BatchNorm(create_scale=True, create_offset=True,
                             decay_rate=0.9, eps=1e-5, scale_init=scale_init,
                             name=name)


def _check_rate(name, rate):
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"{name} must be in [0, 1); got {rate!r}")


def _check_images(images, rank=4):
  images = tf.convert_to_tensor(images)
  if images.shape.rank != rank:
    raise ValueError(f"expected NHWC images of rank {rank}; got shape "
                     f"{images.shape}")
  return images


class PaperNet(snt.Module):
  """Shared by the paper's nets: keyed dropout and BatchNorm conventions."""

  def __init__(self, seed: int, name: Optional[str], dropout: float,
               input_dropout: float = 0.0,
               compute_dtype: Optional[tf.DType] = None):
    super().__init__(name=name)
    # 16-bit compute over float32 variables (see `precision`); None: the
    # input's dtype throughout.
    self.compute_dtype = compute_dtype
    _check_rate("input_dropout", input_dropout)
    _check_rate("dropout", dropout)
    self.input_dropout, self.dropout = input_dropout, dropout
    self.seed = seed
    self.dropout_calls = dropout_lib.call_counter()
    self._keyed_dropout = dropout_lib.KeyedDropout(seed, self.dropout_calls)

  def _begin_call(self, is_training, use_dropout):
    """Starts a forward pass; returns whether dropout is on.

    Cast the images with `precision.to_compute(images, self.compute_dtype)`
    and return `precision.logits_to_float32(logits)`.
    """
    return self._keyed_dropout.begin_call(is_training, use_dropout)

  def _begin_flat_call(self, images, is_training, use_dropout):
    """`_begin_call` for the perceptrons: (flattened images in the compute
    dtype, whether dropout is on)."""
    images = precision.to_compute(_check_images(images), self.compute_dtype)
    dropout = self._begin_call(is_training, use_dropout)
    return tf.reshape(images, [tf.shape(images)[0], -1]), dropout

  def _dropout(self, net, rate, on):
    return self._keyed_dropout(net, rate, on)

  @staticmethod
  def _normalise(bn, net, is_training):
    # test_local_stats=False: evaluation uses the moving statistics.
    return tf.nn.relu(bn(net, is_training=is_training,
                         test_local_stats=False))

  @property
  def batch_norms(self) -> Tuple[snt.BatchNorm, ...]:
    return tuple(m for m in self.submodules if isinstance(m, snt.BatchNorm))


class MnistFC(PaperNet):
  """784-1024-1024-10 perceptron with BatchNorm ("mnistfc")."""

  def __init__(self, num_classes: int = 10, hidden_units: int = 1024,
               input_dropout: float = 0.2, dropout: float = 0.5,
               seed: int = 0, name: Optional[str] = None,
               compute_dtype: Optional[tf.DType] = None, init: str = "he"):
    super().__init__(seed, name, dropout, input_dropout, compute_dtype)
    self.hidden = [precision.Linear(hidden_units, with_bias=False,
                                    name=f"hidden{i}",
                                    **_without_bias(_layer_init(init)))
                   for i in (1, 2)]
    self.hidden_bns = [_batch_norm(f"hidden{i}_bn", init) for i in (1, 2)]
    self.logits_layer = precision.Linear(
        num_classes, name="logits", **_layer_init(init, before_relu=False))

  def __call__(self, images: tf.Tensor, is_training: bool,
               use_dropout: Optional[bool] = None) -> tf.Tensor:
    net, dropout = self._begin_flat_call(images, is_training, use_dropout)
    net = self._dropout(net, self.input_dropout, dropout)
    for linear, bn in zip(self.hidden, self.hidden_bns):
      net = self._normalise(bn, linear(net), is_training)
      net = self._dropout(net, self.dropout, dropout)
    return precision.logits_to_float32(self.logits_layer(net))


class MnistFCIclr17(PaperNet):
  """mnistfc as the paper's runs built it ("mnistfc-iclr17").

  pratikac/explore-hessian `dnn/models.lua` `mnistfc()` (commit 9564f29,
  the version of the January 2017 runs): Linear 784-1024 -> ReLU -> dropout,
  Linear 1024-1024 -> ReLU -> dropout, Linear 1024-10; every layer with a
  bias, no BatchNorm and no input dropout.
  """

  def __init__(self, num_classes: int = 10, hidden_units: int = 1024,
               dropout: float = 0.5, seed: int = 0,
               name: Optional[str] = None,
               compute_dtype: Optional[tf.DType] = None, init: str = "torch"):
    super().__init__(seed, name, dropout, compute_dtype=compute_dtype)
    self.hidden = [precision.Linear(hidden_units, name=f"hidden{i}",
                                    **_layer_init(init))
                   for i in (1, 2)]
    self.logits_layer = precision.Linear(
        num_classes, name="logits", **_layer_init(init, before_relu=False))

  def __call__(self, images: tf.Tensor, is_training: bool,
               use_dropout: Optional[bool] = None) -> tf.Tensor:
    net, dropout = self._begin_flat_call(images, is_training, use_dropout)
    for linear in self.hidden:
      net = self._dropout(tf.nn.relu(linear(net)), self.dropout, dropout)
    return precision.logits_to_float32(self.logits_layer(net))


class LeNet(PaperNet):
  """The paper's LeNet (the reference's "mnistconv")."""

  def __init__(self, num_classes: int = 10, dropout: float = 0.5,
               seed: int = 0, name: Optional[str] = None,
               compute_dtype: Optional[tf.DType] = None, init: str = "he"):
    super().__init__(seed, name, dropout, compute_dtype=compute_dtype)
    self.convs = [
        precision.Conv2D(channels, 5, padding="VALID", with_bias=False,
                         name=f"conv{i}",
                         **_without_bias(_layer_init(init)))
        for i, channels in enumerate((20, 50), start=1)]
    self.conv_bns = [_batch_norm(f"conv{i}_bn", init) for i in (1, 2)]
    self.pool_sizes = (3, 2)
    self.hidden = precision.Linear(500, with_bias=False, name="hidden",
                                   **_without_bias(_layer_init(init)))
    self.hidden_bn = _batch_norm("hidden_bn", init)
    self.logits_layer = precision.Linear(
        num_classes, name="logits", **_layer_init(init, before_relu=False))

  def __call__(self, images: tf.Tensor, is_training: bool,
               use_dropout: Optional[bool] = None) -> tf.Tensor:
    net = precision.to_compute(_check_images(images), self.compute_dtype)
    dropout = self._begin_call(is_training, use_dropout)
    for conv, bn, pool in zip(self.convs, self.conv_bns, self.pool_sizes):
      net = self._normalise(bn, conv(net), is_training)
      net = tf.nn.max_pool2d(net, pool, pool, padding="VALID")
      net = self._dropout(net, self.dropout, dropout)
    net = tf.reshape(net, [tf.shape(net)[0], -1])
    net = self._normalise(self.hidden_bn, self.hidden(net), is_training)
    net = self._dropout(net, self.dropout, dropout)
    return precision.logits_to_float32(self.logits_layer(net))


class LeNetIclr17(PaperNet):
  """LeNet as the paper's runs built it ("lenet-iclr17").

  pratikac/explore-hessian `dnn/models.lua` `mnistconv()` (commit 9564f29):

      conv 20 5x5 (+bias) -> ReLU -> max-pool 3 -> BN -> dropout
      conv 50 5x5 (+bias) -> ReLU -> max-pool 2 -> BN -> dropout
      fc 500 (+bias) -> ReLU -> dropout, fc 10

  BatchNorm comes after the pooling, and the fc-500 layer has none.
  """

  def __init__(self, num_classes: int = 10, dropout: float = 0.5,
               seed: int = 0, name: Optional[str] = None,
               compute_dtype: Optional[tf.DType] = None, init: str = "torch"):
    super().__init__(seed, name, dropout, compute_dtype=compute_dtype)
    self.convs = [
        precision.Conv2D(channels, 5, padding="VALID", name=f"conv{i}",
                         **_layer_init(init))
        for i, channels in enumerate((20, 50), start=1)]
    self.pool_bns = [_batch_norm(f"pool{i}_bn", init) for i in (1, 2)]
    self.pool_sizes = (3, 2)
    self.hidden = precision.Linear(500, name="hidden", **_layer_init(init))
    self.logits_layer = precision.Linear(
        num_classes, name="logits", **_layer_init(init, before_relu=False))

  def __call__(self, images: tf.Tensor, is_training: bool,
               use_dropout: Optional[bool] = None) -> tf.Tensor:
    net = precision.to_compute(_check_images(images), self.compute_dtype)
    dropout = self._begin_call(is_training, use_dropout)
    for conv, bn, pool in zip(self.convs, self.pool_bns, self.pool_sizes):
      net = tf.nn.max_pool2d(tf.nn.relu(conv(net)), pool, pool,
                             padding="VALID")
      net = bn(net, is_training=is_training, test_local_stats=False)
      net = self._dropout(net, self.dropout, dropout)
    net = tf.reshape(net, [tf.shape(net)[0], -1])
    net = self._dropout(tf.nn.relu(self.hidden(net)), self.dropout, dropout)
    return precision.logits_to_float32(self.logits_layer(net))


def _without_bias(layer_init: dict) -> dict:
  """The initialisers of a layer built with `with_bias=False`."""
  return {k: v for k, v in layer_init.items() if k != "b_init"}


# (output channels, kernel, stride) of each conv -> BN -> ReLU layer;
# "dropout" marks where the hidden dropout goes.
_ALLCNN_LAYERS = (
    ("c1", 3, 1), ("c1", 3, 1), ("c1", 3, 2), "dropout",
    ("c2", 3, 1), ("c2", 3, 1), ("c2", 3, 2), "dropout",
    ("c2", 3, 1), ("c2", 3, 1), ("classes", 1, 1))


class AllCNN(PaperNet):
  """All-CNN-BN of the paper, as ucla-vision/entropy-sgd builds it.

      dropout 0.2
      3 x [conv 3x3 96 -> BN -> ReLU], the third with stride 2, dropout
      3 x [conv 3x3 192 -> BN -> ReLU], the third with stride 2, dropout
      2 x [conv 3x3 192 -> BN -> ReLU], conv 1x1 classes -> BN -> ReLU
      global average pool -> logits

  Convolutions are zero-padded ("SAME"). Where this differs from All-CNN-C
  (Springenberg et al., 2015), it follows the reference: its seventh layer
  is padded (All-CNN-C: valid), its eighth is 3x3 (All-CNN-C: 1x1), and its
  class layer has BatchNorm and ReLU before the average pool, so the logits
  are non-negative. The reference pools 8x8, which is global for 32x32
  inputs.
  """

  def __init__(self, num_classes: int = 10, channels: Tuple[int, int] = (96,
                                                                          192),
               input_dropout: float = 0.2, dropout: float = 0.5,
               seed: int = 0, name: Optional[str] = None,
               compute_dtype: Optional[tf.DType] = None, init: str = "he"):
    super().__init__(seed, name, dropout, input_dropout, compute_dtype)
    widths = {"c1": channels[0], "c2": channels[1], "classes": num_classes}
    self.layers = []
    for layer in _ALLCNN_LAYERS:
      if layer == "dropout":
        self.layers.append(layer)
        continue
      width, kernel, stride = layer
      index = sum(1 for l in self.layers if l != "dropout") + 1
      self.layers.append((
          precision.Conv2D(widths[width], kernel, stride=stride,
                           padding="SAME", with_bias=False,
                           name=f"conv{index}",
                           **_without_bias(_layer_init(init))),
          _batch_norm(f"conv{index}_bn", init)))

  def __call__(self, images: tf.Tensor, is_training: bool,
               use_dropout: Optional[bool] = None) -> tf.Tensor:
    dropout = self._begin_call(is_training, use_dropout)
    net = self._dropout(
        precision.to_compute(_check_images(images), self.compute_dtype),
        self.input_dropout, dropout)
    for layer in self.layers:
      if layer == "dropout":
        net = self._dropout(net, self.dropout, dropout)
      else:
        conv, bn = layer
        net = self._normalise(bn, conv(net), is_training)
    return precision.logits_to_float32(tf.reduce_mean(net, axis=[1, 2]))


# -------------------------------------------------------------- Model names.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What `--model=NAME` builds and which datasets it is meant for."""
  name: str
  datasets: Tuple[str, ...]
  # (num_classes, dropout, seed=, compute_dtype=, init=) -> module.
  build: Callable[..., snt.Module]
  default_dropout: float
  # The recipes' key: "mnistfc", "lenet", "allcnn" or "wrn".
  family: str
  default_init: str = "he"


_MNIST_DATASETS = ("mnist",)
_CIFAR_DATASETS = ("cifar10", "cifar100")


def _paper_spec(name, module, datasets, family, default_init="he"):
  def build(classes, dropout, seed=0, compute_dtype=None, init=None, **_):
    return module(classes, dropout=dropout, seed=seed,
                  compute_dtype=compute_dtype, init=init or default_init)
  return ModelSpec(name, datasets, build, 0.5, family, default_init)


_PAPER_MODELS = {spec.name: spec for spec in (
    _paper_spec("mnistfc", MnistFC, _MNIST_DATASETS, "mnistfc"),
    _paper_spec("lenet", LeNet, _MNIST_DATASETS, "lenet"),
    _paper_spec("mnistfc-iclr17", MnistFCIclr17, _MNIST_DATASETS, "mnistfc",
                "torch"),
    _paper_spec("lenet-iclr17", LeNetIclr17, _MNIST_DATASETS, "lenet",
                "torch"),
    _paper_spec("allcnn", AllCNN, _CIFAR_DATASETS, "allcnn"),
)}
MODEL_NAMES = tuple(_PAPER_MODELS) + ("wrn-DEPTH-WIDTH",)


def model_family(name: str) -> str:
  """"mnistfc", "lenet", "allcnn" or "wrn"; ValueError for unknown names.

  "mnistfc-iclr17" and "lenet-iclr17" belong to the families of the nets
  they are earlier versions of, so they share their recipes.
  """
  return spec(name).family


def spec(name: str) -> ModelSpec:
  """The `ModelSpec` of `--model=name`."""
  name = name.strip().lower()
  if name in _PAPER_MODELS:
    return _PAPER_MODELS[name]
  if wide_resnet.model_name_parts(name) is None:
    raise ValueError(f"--model={name!r} is unknown; choose one of "
                     f"{', '.join(MODEL_NAMES)} (e.g. wrn-28-10).")
  depth, width = wide_resnet.parse_model_name(name)  # Checks both.
  return ModelSpec(
      name, _CIFAR_DATASETS,
      lambda classes, dropout, cross_replica_batch_norm=False,
      compute_dtype=None, seed=0, **_: (
          wide_resnet.WideResNet(
              depth, width, classes, dropout_rate=dropout,
              cross_replica_batch_norm=cross_replica_batch_norm,
              compute_dtype=compute_dtype, seed=seed)), 0.0, "wrn")


def models_for(dataset: str) -> List[str]:
  """The model names built for `dataset`; "wrn-28-10" stands for the WRNs."""
  names = [m if m in _PAPER_MODELS else "wrn-28-10" for m in MODEL_NAMES]
  return [m for m in names if dataset in spec(m).datasets]


def check_fits(name: str, dataset: str):
  """ValueError unless model `name` is meant for `dataset`."""
  model_spec = spec(name)
  if dataset not in model_spec.datasets:
    suitable = [m if m in _PAPER_MODELS else "wrn-DEPTH-WIDTH"
                for m in models_for(dataset)]
    raise ValueError(
        f"--model={name} is built for {'/'.join(model_spec.datasets)}, not "
        f"{dataset}; choose one of {', '.join(suitable)}.")


def build(name: str, num_classes: int, dropout: Optional[float] = None,
          cross_replica_batch_norm: bool = False,
          seed: int = 0,
          compute_dtype: Optional[tf.DType] = None,
          init: Optional[str] = None) -> snt.Module:
  """The (unbuilt) module of `--model=name`.

  `cross_replica_batch_norm` (synchronised BatchNorm) is supported by the
  Wide ResNets; the paper's nets refuse it. `seed` keys the dropout masks
  of every model. `compute_dtype` (bfloat16 or float16; None: float32)
  runs the forward and backward passes in 16 bits over float32 variables
  (see `precision`). `init` ("he" or "torch", see `INITIALISATIONS`; None:
  the model's own) sets the paper nets' initialisation.
  """
  model_spec = spec(name)
  if cross_replica_batch_norm and model_family(name) != "wrn":
    raise ValueError(f"--sync_batch_norm is implemented for the Wide ResNets,"
                     f" not --model={name}.")
  rate = model_spec.default_dropout if dropout is None else dropout
  if model_spec.family == "wrn":
    if init not in (None, "he"):
      raise ValueError(f"--init={init} is implemented for the paper's nets, "
                       f"not --model={name}; drop it.")
    return model_spec.build(num_classes, rate,
                            cross_replica_batch_norm=cross_replica_batch_norm,
                            compute_dtype=compute_dtype, seed=seed)
  return model_spec.build(num_classes, rate, seed=seed,
                          compute_dtype=compute_dtype, init=init)


def reference_parameter_count(name: str, num_classes: int = 10,
                              input_shape: Sequence[int] = MNIST_SHAPE
                              ) -> int:
  """Trainable scalars of the reference's PyTorch model (biases included).

  Closed forms, written from the layer list alone (not from our modules):
  a linear layer a->b has a*b + b, a conv k x k from a to b channels
  k*k*a*b + b, and a BatchNorm over c channels 2c.
  """
  def linear(a, b):
    return a * b + b

  def conv(k, a, b):
    return k * k * a * b + b

  name = name.strip().lower()
  if name == "mnistfc-iclr17":  # No BatchNorm.
    pixels = input_shape[0] * input_shape[1] * input_shape[2]
    return (linear(pixels, 1024) + linear(1024, 1024)
            + linear(1024, num_classes))
  if name == "lenet-iclr17":  # No BatchNorm on fc 500.
    return (conv(5, input_shape[2], 20) + 2 * 20 + conv(5, 20, 50) + 2 * 50
            + linear(50 * 2 * 2, 500) + linear(500, num_classes))
  family = model_family(name)
  if family == "mnistfc":
    pixels = input_shape[0] * input_shape[1] * input_shape[2]
    return (linear(pixels, 1024) + 2 * 1024 + linear(1024, 1024) + 2 * 1024
            + linear(1024, num_classes))
  if family == "lenet":
    return (conv(5, input_shape[2], 20) + 2 * 20 + conv(5, 20, 50) + 2 * 50
            + linear(50 * 2 * 2, 500) + 2 * 500 + linear(500, num_classes))
  if family == "allcnn":
    c1, c2 = 96, 192
    return (conv(3, input_shape[2], c1) + 2 * conv(3, c1, c1) + 3 * 2 * c1
            + conv(3, c1, c2) + 4 * conv(3, c2, c2) + 5 * 2 * c2
            + conv(1, c2, num_classes) + 2 * num_classes)
  raise ValueError(f"no reference count for --model={name}")
