"""Wide Residual Network (WRN) for CIFAR-sized images, in Sonnet 2.

Implements WRN-d-k from Zagoruyko & Komodakis, "Wide Residual Networks"
(BMVC 2016, arXiv:1605.07146):

  3x3 conv (16 channels)
  -> group 1: n pre-activation basic blocks, 16k channels, stride 1
  -> group 2: n blocks, 32k channels, first block stride 2
  -> group 3: n blocks, 64k channels, first block stride 2
  -> BatchNorm -> ReLU -> global average pool -> linear logits

with depth d = 6n + 4 and widening factor k. Each block computes

  BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> [dropout] -> conv3x3

and adds a shortcut: the identity when the shape is unchanged, otherwise a
1x1 strided projection of the pre-activated (BN -> ReLU) input, as in the
authors' reference code. Convolutions have no bias. The logits layer is
zero-initialised, so an untrained network outputs exactly zero logits.

With `cross_replica_batch_norm=True` every BatchNorm is a
`CrossReplicaBatchNorm`: in training its batch statistics are those of the
global batch over all replicas of the strategy (synchronised BatchNorm).
Under a strategy with a single replica the statistics are local anyway, so
the network keeps `snt.BatchNorm` and its fused kernel.

With `compute_dtype` (bfloat16 or float16) the network computes in 16 bits
over float32 variables and returns float32 logits (`precision`).

Input: NHWC float images, e.g. [batch, 32, 32, 3].
"""

from __future__ import annotations

import numbers
import re
from typing import Optional

import sonnet as snt
import tensorflow as tf

from entropy_sgd.core import precision
from entropy_sgd.workloads import dropout as dropout_lib

_STEM_CHANNELS = 16
_GROUP_BASE_CHANNELS = (16, 32, 64)
_GROUP_STRIDES = (1, 2, 2)
_DEPTH_RULE = "6n+4 (10, 16, 22, 28, 34, 40, ...)"
_MODEL_NAME_PATTERN = re.compile(r"wrn-(\d+)-(\d+)", re.IGNORECASE)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def blocks_per_group(depth: int) -> int:
  """Returns n for depth = 6n + 4; raises ValueError for any other depth."""
  if not _is_int(depth) or depth < 10 or (depth - 4) % 6 != 0:
    raise ValueError(f"WideResNet depth must be {_DEPTH_RULE}; got {depth!r}")
  return (int(depth) - 4) // 6


def model_name_parts(name) -> Optional[tuple[int, int]]:
  """(depth, width) of a name shaped like "wrn-28-10" (any case), unchecked;
  None for any other name."""
  match = None
  if isinstance(name, str):
    match = _MODEL_NAME_PATTERN.fullmatch(name.strip())
  return None if match is None else (int(match.group(1)), int(match.group(2)))


def parse_model_name(name: str) -> tuple[int, int]:
  """Parses a name such as "wrn-28-10" or "WRN-16-1" into (depth, width)."""
  parts = model_name_parts(name)
  if parts is None:
    raise ValueError(
        f"WideResNet name must look like 'wrn-<depth>-<width>' "
        f"(e.g. 'wrn-28-10'); got {name!r}")
  depth, width = parts
  blocks_per_group(depth)
  if width < 1:
    raise ValueError(f"WideResNet width must be >= 1; got {width} in {name!r}")
  return depth, width


def num_parameters(module: tf.Module) -> int:
  """Number of trainable scalars in `module`.

  Sonnet modules create variables on their first call; asking an unbuilt
  snt.Module for its variables raises Sonnet's ValueError.
  """
  return sum(v.shape.num_elements() for v in module.trainable_variables)


def _he_normal() -> snt.initializers.Initializer:
  # He et al. 2015 init; fan_out matches the WRN authors' Torch code
  # (std = sqrt(2 / (k * k * out_channels))). fan_in == fan_out except in the
  # few convs that change the channel count.
  return snt.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")


def _conv(channels: int, kernel: int, stride: int, name: str) -> snt.Conv2D:
  return precision.Conv2D(
      output_channels=channels,
      kernel_shape=kernel,
      stride=stride,
      padding="SAME",
      with_bias=False,
      w_init=_he_normal(),
      name=name)


class CrossReplicaBatchNorm(precision.BatchNorm):
  """BatchNorm whose batch statistics cover all replicas (synchronised BN).

  With batch statistics (training) each replica sums its inputs, their
  squares and its count per channel; one SUM all-reduce over the replicas
  gives the mean and (biased) variance of the global batch, which every
  replica then normalises with and feeds to its moving averages. So a model
  under `MirroredStrategy` computes what it computes on one device with the
  whole batch, and unequal per-replica batches are weighted correctly.
  Outside a replica context (building in `strategy.scope()`) and with one
  replica the statistics are local. Otherwise identical to `snt.BatchNorm`
  (same variables and names); gradients flow through the all-reduce.

  Sonnet's `snt.distribute.CrossReplicaBatchNorm` cannot be used here: it
  refuses to be called in cross-replica context, where `build_model`
  creates the variables.
  """

  @snt.once
  def _initialize(self, inputs: tf.Tensor):
    super()._initialize(inputs)
    self._fused = False  # The fused op computes local statistics itself.

  def _moments(self, inputs, use_batch_stats):
    if not use_batch_stats:
      return super()._moments(inputs, use_batch_stats)
    sums = tf.reduce_sum(inputs, self._axis, keepdims=True)
    squares = tf.reduce_sum(tf.square(inputs), self._axis, keepdims=True)
    count = tf.cast(tf.size(inputs), inputs.dtype) / tf.cast(
        tf.size(sums), inputs.dtype)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
      sums, squares, count = context.all_reduce(
          tf.distribute.ReduceOp.SUM, (sums, squares, count))
    mean = sums / count
    variance = tf.maximum(squares / count - tf.square(mean), 0.0)
    return mean, variance


def _batch_norm(bn_config: dict, name: str) -> snt.BatchNorm:
  config = dict(bn_config)
  cross_replica = config.pop("cross_replica")
  return (CrossReplicaBatchNorm if cross_replica else precision.BatchNorm)(
      **config, name=name)


class PreActBasicBlock(snt.Module):
  """Pre-activation residual block with two 3x3 convolutions."""

  def __init__(self,
               in_channels: int,
               out_channels: int,
               stride: int,
               dropout_rate: float,
               bn_config: dict,
               keyed_dropout: Optional[dropout_lib.KeyedDropout] = None,
               name: Optional[str] = None):
    """`keyed_dropout`: the network's (needed when `dropout_rate` > 0)."""
    super().__init__(name=name)
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.stride = stride
    self._bn_in = _batch_norm(bn_config, "bn_in")
    self._conv_in = _conv(out_channels, 3, stride, name="conv_in")
    self._bn_mid = _batch_norm(bn_config, "bn_mid")
    if dropout_rate > 0 and keyed_dropout is None:
      raise ValueError("a block with dropout needs the network's "
                       "keyed_dropout")
    self._dropout_rate = dropout_rate
    self._keyed_dropout = keyed_dropout
    self._conv_out = _conv(out_channels, 3, 1, name="conv_out")
    needs_projection = in_channels != out_channels or stride != 1
    self.projection = (
        _conv(out_channels, 1, stride, name="projection")
        if needs_projection else None)

  @property
  def batch_norms(self) -> tuple[snt.BatchNorm, ...]:
    return (self._bn_in, self._bn_mid)

  def __call__(self, inputs: tf.Tensor, is_training: bool,
               dropout: bool = False) -> tf.Tensor:
    """`dropout`: whether this pass drops (see `WideResNet.__call__`)."""
    # test_local_stats=False: evaluation normalises with the moving statistics.
    preactivated = tf.nn.relu(
        self._bn_in(inputs, is_training=is_training, test_local_stats=False))
    if self.projection is None:
      shortcut = inputs
    else:
      shortcut = self.projection(preactivated)
    net = self._conv_in(preactivated)
    net = tf.nn.relu(
        self._bn_mid(net, is_training=is_training, test_local_stats=False))
    if self._keyed_dropout is not None:
      net = self._keyed_dropout(net, self._dropout_rate, dropout)
    net = self._conv_out(net)
    return net + shortcut


class WideResNet(snt.Module):
  """WRN-depth-width classifier (Zagoruyko & Komodakis, 2016).

  Variables are created on the first call. `is_training` must be a Python
  bool: True uses batch statistics, updates the BatchNorm moving averages and
  enables dropout; False uses the moving averages and no dropout;
  `use_dropout` overrides the dropout (as the paper nets'). Dropout is keyed
  by `seed` and a count of training calls (`dropout.KeyedDropout`), so a
  resumed run draws the masks an uninterrupted one would. Note that
  Sonnet's moving variance starts at 0, so evaluate only after at least one
  training-mode call. `cross_replica_batch_norm=True` synchronises the batch
  statistics over replicas (see `CrossReplicaBatchNorm`).
  """

  def __init__(self,
               depth: int,
               width: int,
               num_classes: int,
               dropout_rate: float = 0.0,
               bn_decay_rate: float = 0.9,
               bn_eps: float = 1e-5,
               cross_replica_batch_norm: bool = False,
               compute_dtype: Optional[tf.DType] = None,
               seed: int = 0,
               name: Optional[str] = None):
    """Builds the modules of a WRN-`depth`-`width` with `num_classes` logits.

    `compute_dtype` (bfloat16 or float16; None: the input's dtype) runs the
    network in 16 bits over float32 variables (see `precision`).
    """
    super().__init__(name=name)
    num_blocks = blocks_per_group(depth)
    if not _is_int(width) or width < 1:
      raise ValueError(f"WideResNet width must be an int >= 1; got {width!r}")
    if not _is_int(num_classes) or num_classes < 1:
      raise ValueError(
          f"WideResNet num_classes must be an int >= 1; got {num_classes!r}")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(
          f"WideResNet dropout_rate must be in [0, 1); got {dropout_rate!r}")
    if not 0.0 <= bn_decay_rate < 1.0:
      raise ValueError(
          f"WideResNet bn_decay_rate must be in [0, 1); got {bn_decay_rate!r}")
    if not bn_eps > 0.0:
      raise ValueError(f"WideResNet bn_eps must be > 0; got {bn_eps!r}")

    # One replica: synchronised statistics are the local ones; keep the fused
    # BatchNorm kernel.
    cross_replica_batch_norm = cross_replica_batch_norm and (
        tf.distribute.get_strategy().num_replicas_in_sync > 1)
    self.depth = int(depth)
    self.width = int(width)
    self.num_classes = int(num_classes)
    self.dropout_rate = dropout_rate
    self.compute_dtype = compute_dtype
    # Only with dropout: runs without it keep their checkpoints' layout.
    self._keyed_dropout = None
    if dropout_rate > 0:
      self.dropout_calls = dropout_lib.call_counter()
      self._keyed_dropout = dropout_lib.KeyedDropout(seed, self.dropout_calls)
    bn_config = dict(
        create_scale=True,
        create_offset=True,
        decay_rate=bn_decay_rate,
        eps=bn_eps,
        cross_replica=cross_replica_batch_norm)

    self.stem = _conv(_STEM_CHANNELS, 3, 1, name="stem_conv")
    blocks = []
    in_channels = _STEM_CHANNELS
    for group, (base_channels, group_stride) in enumerate(
        zip(_GROUP_BASE_CHANNELS, _GROUP_STRIDES), start=1):
      out_channels = base_channels * width
      for index in range(num_blocks):
        blocks.append(
            PreActBasicBlock(
                in_channels=in_channels,
                out_channels=out_channels,
                stride=group_stride if index == 0 else 1,
                dropout_rate=dropout_rate,
                bn_config=bn_config,
                keyed_dropout=self._keyed_dropout,
                name=f"group{group}_block{index + 1}"))
        in_channels = out_channels
    self.blocks = tuple(blocks)
    self._final_bn = _batch_norm(bn_config, "final_bn")
    self.logits_layer = precision.Linear(
        num_classes,
        w_init=snt.initializers.Zeros(),
        b_init=snt.initializers.Zeros(),
        name="logits")

  @property
  def batch_norms(self) -> tuple[snt.BatchNorm, ...]:
    """All BatchNorm modules, in forward order."""
    per_block = tuple(bn for block in self.blocks for bn in block.batch_norms)
    return per_block + (self._final_bn,)

  def __call__(self, images: tf.Tensor, is_training: bool,
               use_dropout: Optional[bool] = None) -> tf.Tensor:
    """Maps [batch, height, width, channels] images to [batch, classes]."""
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
      raise ValueError(
          f"WideResNet expects NHWC images of rank 4; got shape {images.shape}")
    net = self.stem(precision.to_compute(images, self.compute_dtype))
    dropout = (self._keyed_dropout is not None and
               self._keyed_dropout.begin_call(is_training, use_dropout))
    for block in self.blocks:
      net = block(net, is_training=is_training, dropout=dropout)
    net = tf.nn.relu(
        self._final_bn(net, is_training=is_training, test_local_stats=False))
    net = tf.reduce_mean(net, axis=[1, 2])
    return precision.logits_to_float32(self.logits_layer(net))
