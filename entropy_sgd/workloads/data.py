"""CIFAR-10/100 and MNIST input pipelines for training and evaluation.

Data come from tensorflow-datasets (the default), or from the original files
when `data_dir` is given: `cifar-10-batches-bin/` (data_batch_1..5.bin,
test_batch.bin) or `cifar-100-binary/` (train.bin, test.bin), each file plain
or gzipped (`.bin.gz`); for MNIST the four IDX files
(`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
`t10k-labels-idx1-ubyte`), plain or `.gz`. Files are checked before training;
problems raise `DataError` with a one-line explanation naming the file.

Training pipeline, per input pipeline (worker):

  records -> enumerate (example index) -> drop the held-out validation tail
  -> shard -> shuffle(seed, reshuffled each epoch) -> repeat -> decode and
  draw augmentation parameters keyed by (seed, epoch, example index)
  -> batch -> augment (one projective transform per image) and normalise.

For a fixed seed the batches are identical across runs. Augmentations: random
horizontal flip; rotation by an angle uniform in [-rotation_degrees,
+rotation_degrees] about the image centre (bilinear); pad-4-and-crop, done as
an integer translation. Pixels moved in from outside the image are 0 (black,
before normalisation), as with zero padding. Images are normalised per
channel with the mean and std of the training images (after removing the
validation hold-out), in [0, 1] pixel scale. MNIST is normalised the same way
and, by default, not augmented.
"""

import dataclasses
import functools
import gzip
import math
import os
import socket
import struct
import threading
import urllib.parse
import urllib.request
import zlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

DATASETS = {"cifar10": 10, "cifar100": 100, "mnist": 10}
IMAGE_SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3),
                "mnist": (28, 28, 1)}
AUGMENTATIONS = ("flip_rotate", "flip_crop", "flip_crop_rotate", "none")
PREPROCESSING = ("standardize", "gcn_zca")
# Added to sqrt(eigenvalue) in the ZCA matrix: the value of the paper runs'
# preprocessing (pratikac/explore-hessian dnn/preprocess_cifar10.py at
# 4eed403, `PCA.transform(regularizer=1e-5)`).
ZCA_BIAS = 1e-5
SPLITS = ("train", "validation", "test")
# The largest rotation of the "*rotate" augmentations unless told (the
# launchers' default; PipelineConfig had 10 until 2026-12-02).
DEFAULT_ROTATION_DEGREES = 15.0
IMAGE_SIZE = 32  # CIFAR's.
CROP_PADDING = 4
# Random-augmentation streams: training, and BatchNorm recalibration batches.
_TRAINING_STREAM, _RECALIBRATION_STREAM = 0, 1
_PIXEL_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3
_PRETTY_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
                 "mnist": "MNIST"}


class DataError(ValueError):
  """The data are missing, unreadable or corrupt."""


def num_classes(name: str) -> int:
  """Number of classes of dataset `name` (see `DATASETS`)."""
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; choose from {list(DATASETS)}.")
  return DATASETS[name]


def image_shape(name: str) -> Tuple[int, int, int]:
  """(height, width, channels) of the images of dataset `name`."""
  num_classes(name)
  return IMAGE_SHAPES[name]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What to read and how to feed it.

  Attributes:
    dataset: "cifar10" or "cifar100".
    batch_size: GLOBAL training batch size (over all replicas).
    data_dir: directory holding the binary layout (or the layout folder
      itself); None reads tensorflow-datasets.
    validation_examples: the last N training images, held out of training
      and served as the "validation" split.
    augment: training augmentation, one of `AUGMENTATIONS`.
    preprocess: "standardize" (per-channel mean and std of the training
      images) or "gcn_zca" (global contrast normalisation, then ZCA
      whitening fitted on the training images only; see `fit_zca`).
    rotation_degrees: maximum absolute rotation angle, for "*rotate".
    seed: seeds shuffling and augmentation.
    shuffle_buffer: shuffle buffer size (default: a whole CIFAR split).
    eval_batch_size: global evaluation batch size; None uses batch_size.
    tfds_data_dir: tensorflow-datasets data_dir; None uses its default.
    download: let tensorflow-datasets download and prepare missing data.
  """
  dataset: str = "cifar10"
  batch_size: int = 128
  data_dir: Optional[str] = None
  validation_examples: int = 0
  augment: str = "flip_crop"
  preprocess: str = "standardize"
  rotation_degrees: float = DEFAULT_ROTATION_DEGREES
  seed: int = 0
  shuffle_buffer: int = 50_000
  eval_batch_size: Optional[int] = None
  tfds_data_dir: Optional[str] = None
  download: bool = True

  def __post_init__(self):
    num_classes(self.dataset)
    if self.augment not in AUGMENTATIONS:
      raise ValueError(f"Unknown augment {self.augment!r}; choose from "
                       f"{AUGMENTATIONS}.")
    if self.preprocess not in PREPROCESSING:
      raise ValueError(f"Unknown preprocess {self.preprocess!r}; choose "
                       f"from {PREPROCESSING}.")
    if self.batch_size < 1 or (self.eval_batch_size or 1) < 1:
      raise ValueError("Batch sizes must be positive.")
    if self.validation_examples < 0 or self.shuffle_buffer < 1:
      raise ValueError("validation_examples must be >= 0 and shuffle_buffer "
                       ">= 1.")


# ------------------------------------------------------------------ Sources.


@dataclasses.dataclass(frozen=True)
class _BinaryLayout:
  folder: str
  files: dict  # split -> file names (without .gz)
  label_bytes: int  # Bytes before the pixels of each record.
  label_offset: int  # Which of them is the (fine) label.
  description: str

  @property
  def record_bytes(self):
    return self.label_bytes + _PIXEL_BYTES


_LAYOUTS = {
    "cifar10": _BinaryLayout(
        "cifar-10-batches-bin",
        {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
         "test": ("test_batch.bin",)},
        label_bytes=1, label_offset=0,
        description="cifar-10-batches-bin/ (data_batch_1..5.bin, "
        "test_batch.bin; plain or .gz)"),
    "cifar100": _BinaryLayout(
        "cifar-100-binary", {"train": ("train.bin",), "test": ("test.bin",)},
        label_bytes=2, label_offset=1,
        description="cifar-100-binary/ (train.bin, test.bin; plain or .gz)"),
}


def _corrupt(path, problem, dataset="CIFAR"):
  return DataError(f"corrupt or truncated {dataset} file {path}: {problem}; "
                   "re-download it")


def _stored_bytes(path):
  """Size of the (decompressed) content; reads only the gzip trailer."""
  if not path.endswith(".gz"):
    return os.path.getsize(path)
  with open(path, "rb") as f:
    magic = f.read(2)
    file_size = f.seek(0, os.SEEK_END)
    if magic != b"\x1f\x8b" or file_size < 18:
      raise _corrupt(path, "not a gzip file")
    f.seek(-4, os.SEEK_END)
    return struct.unpack("<I", f.read(4))[0]  # ISIZE: size mod 2**32.


class _BinarySource:
  """The original binary files; records are raw byte strings."""

  def __init__(self, dataset, data_dir):
    self._layout = layout = _LAYOUTS[dataset]
    self._num_classes = DATASETS[dataset]
    if not os.path.isdir(data_dir):
      raise DataError(f"--data_dir={data_dir} does not exist; it should hold "
                      f"{layout.description}")
    folder = os.path.join(data_dir, layout.folder)
    if not os.path.isdir(folder):
      folder = data_dir  # data_dir may be the layout folder itself.
    self._files, missing = {}, []
    for split, names in layout.files.items():
      self._files[split] = []
      for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(path) and os.path.exists(path + ".gz"):
          path += ".gz"
        (self._files[split] if os.path.exists(path) else missing).append(path)
    if missing:
      raise DataError(
          f"No {_PRETTY_NAMES[dataset]} data in --data_dir={data_dir}: "
          f"expected {layout.description}; missing {', '.join(missing)}")
    self._counts = {split: sum(self._check_size(p) for p in paths)
                    for split, paths in self._files.items()}
    self.key = ("binary", os.path.realpath(folder))

  def _check_size(self, path, size=None):
    """Records in `path` (of `size` bytes); DataError if the size is wrong."""
    size = _stored_bytes(path) if size is None else size
    if size == 0 or size % self._layout.record_bytes:
      raise _corrupt(path, f"{size} bytes is not a positive multiple of the "
                     f"{self._layout.record_bytes}-byte record")
    return size // self._layout.record_bytes

  def num_records(self, split):
    return self._counts[split]

  def records(self, split):
    return functools.reduce(tf.data.Dataset.concatenate, [
        tf.data.FixedLengthRecordDataset(
            path, self._layout.record_bytes,
            compression_type="GZIP" if path.endswith(".gz") else None)
        for path in self._files[split]])

  def decode(self, record):
    """Raw record -> (uint8 image [32, 32, 3], int32 label)."""
    values = tf.io.decode_raw(record, tf.uint8)
    label = tf.cast(values[self._layout.label_offset], tf.int32)
    planes = tf.reshape(values[self._layout.label_bytes:],
                        [3, IMAGE_SIZE, IMAGE_SIZE])
    return tf.transpose(planes, [1, 2, 0]), label

  def numpy_chunks(self, split) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yields (pixels uint8 [n, 3, 1024], labels) per file, fully checked."""
    for path in self._files[split]:
      try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
          content = f.read()
      except (OSError, EOFError, zlib.error) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
      self._check_size(path, len(content))
      rows = np.frombuffer(content, np.uint8).reshape(
          -1, self._layout.record_bytes)
      labels = rows[:, self._layout.label_offset]
      bad = np.flatnonzero(labels >= self._num_classes)
      if bad.size:
        raise _corrupt(path, f"record {bad[0]} has label {labels[bad[0]]}, "
                       f"outside [0, {self._num_classes})")
      yield rows[:, self._layout.label_bytes:].reshape(-1, 3, 1024), labels


_IDX_FILES = {  # split -> (images, labels), without .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DESCRIPTION = ("the MNIST IDX files train-images-idx3-ubyte, "
                    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                    "t10k-labels-idx1-ubyte (plain or .gz)")
_IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803, 0x0801.


def _read_idx(path, kind, expected_count=None):
  """The array of one MNIST IDX file, fully checked; DataError otherwise."""
  try:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
      content = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise _corrupt(path, f"{type(e).__name__}: {e}", "MNIST") from e
  dims = 3 if kind == "images" else 1
  header_bytes = 4 + 4 * dims
  if len(content) < header_bytes:
    raise _corrupt(path, f"{len(content)} bytes is shorter than the "
                   f"{header_bytes}-byte IDX header", "MNIST")
  magic, *shape = struct.unpack(f">{1 + dims}I", content[:header_bytes])
  if magic != _IDX_MAGIC[kind]:
    raise _corrupt(path, f"magic number {magic} is not {_IDX_MAGIC[kind]} "
                   f"(IDX {kind})", "MNIST")
  if kind == "images" and tuple(shape[1:]) != IMAGE_SHAPES["mnist"][:2]:
    raise _corrupt(path, f"images are {shape[1]}x{shape[2]}, not 28x28",
                   "MNIST")
  if expected_count is not None and shape[0] != expected_count:
    raise _corrupt(path, f"holds {shape[0]} {kind} but its images file "
                   f"holds {expected_count}", "MNIST")
  expected_bytes = header_bytes + int(np.prod(shape))
  if len(content) != expected_bytes:
    raise _corrupt(path, f"{len(content)} bytes, but its header promises "
                   f"{expected_bytes}", "MNIST")
  values = np.frombuffer(content, np.uint8, offset=header_bytes)
  if kind == "labels" and values.size and values.max() > 9:
    bad = int(np.flatnonzero(values > 9)[0])
    raise _corrupt(path, f"label {values[bad]} of example {bad} is not a "
                   f"digit 0-9", "MNIST")
  return values.reshape(shape)


class _IdxSource:
  """The original MNIST IDX files, read into memory (47 MB)."""

  def __init__(self, data_dir):
    if not os.path.isdir(data_dir):
      raise DataError(f"--data_dir={data_dir} does not exist; it should hold "
                      f"{_IDX_DESCRIPTION}")
    paths, missing = {}, []
    for split, names in _IDX_FILES.items():
      for name in names:
        path = os.path.join(data_dir, name)
        if not os.path.exists(path) and os.path.exists(path + ".gz"):
          path += ".gz"
        if not os.path.exists(path):
          missing.append(path)
        paths[name] = path
    if missing:
      raise DataError(f"No MNIST data in --data_dir={data_dir}: expected "
                      f"{_IDX_DESCRIPTION}; missing {', '.join(missing)}")
    self._arrays = {}
    for split, (images_name, labels_name) in _IDX_FILES.items():
      images = _read_idx(paths[images_name], "images")
      labels = _read_idx(paths[labels_name], "labels", len(images))
      self._arrays[split] = (images[..., None], labels.astype(np.int32))
    self.key = ("idx", os.path.realpath(data_dir))

  def num_records(self, split):
    return len(self._arrays[split][1])

  def records(self, split):
    return tf.data.Dataset.from_tensor_slices(self._arrays[split])

  def decode(self, record):
    return record

  def numpy_chunks(self, split):
    images, labels = self._arrays[split]
    yield images.reshape(len(images), -1, 1).transpose(0, 2, 1), labels


# Where tensorflow-datasets fetches each dataset: the prepared copy on GCS
# (tried first) and the original files (the URLs in its builders). A
# download is possible when any of them answers.
_TFDS_GCS = ("storage.googleapis.com", 443)
_TFDS_DOWNLOAD_HOSTS = {
    "cifar10": (_TFDS_GCS, ("www.cs.toronto.edu", 443)),
    "cifar100": (_TFDS_GCS, ("www.cs.toronto.edu", 443)),
    "mnist": (_TFDS_GCS,),
}
_PROBE_TIMEOUT_SECONDS = 4.0


def _connect_problem(host: str, port: int,
                     timeout: float) -> Optional[str]:
  """None if a TCP connection to host:port opens within `timeout` seconds,
  name resolution included; otherwise what went wrong, in a few words.

  The probe runs in a daemon thread, so a resolver that hangs cannot hold
  the caller longer than `timeout`.
  """
  outcome = []

  def probe():
    try:
      with socket.create_connection((host, port), timeout=timeout):
        outcome.append(None)
    except OSError as e:
      outcome.append(f"{type(e).__name__}: {e.strerror or e}")

  thread = threading.Thread(target=probe, name="download-probe",
                            daemon=True)
  thread.start()
  thread.join(timeout)
  return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _via_proxy(host: str, port: int) -> Tuple[str, int]:
  """The address an HTTPS request to host:port connects to first: the
  proxy from the environment (https_proxy, all_proxy) unless no_proxy
  bypasses it, else host:port itself."""
  proxies = urllib.request.getproxies()
  proxy = proxies.get("https") or proxies.get("all")
  if not proxy or urllib.request.proxy_bypass(host):
    return host, port
  parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
  default_port = 443 if parts.scheme == "https" else 80
  return parts.hostname or host, parts.port or default_port


def _unreachable_download_hosts(
    hosts: Sequence[Tuple[str, int]],
    timeout: float = _PROBE_TIMEOUT_SECONDS) -> Optional[str]:
  """None if any of `hosts` (through the proxy, if any) accepts a TCP
  connection within `timeout` seconds; otherwise why none did. The hosts
  are probed in parallel."""
  addresses = [_via_proxy(host, port) for host, port in hosts]
  problems = ["no answer"] * len(addresses)  # None: reachable.

  def probe(i):
    problems[i] = _connect_problem(*addresses[i], timeout)

  threads = [threading.Thread(target=probe, args=(i,), daemon=True)
             for i in range(len(addresses))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout + 1.0)
  if any(problem is None for problem in problems):
    return None
  return "; ".join(f"{host}:{port} {problem}"
                   for (host, port), problem in zip(addresses, problems))


class _TfdsSource:
  """tensorflow-datasets; records are (uint8 image, label) pairs.

  A dataset that is not prepared yet needs a download. Offline,
  tensorflow-datasets would retry for minutes before failing; a TCP probe of
  its download hosts (a few seconds at most) fails first, with the same
  one-line error.
  """

  def __init__(self, dataset, data_dir, download):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._tfds = tfds
      self._builder = tfds.builder(dataset, data_dir=data_dir)
      if download and not self._builder.is_prepared():
        problem = _unreachable_download_hosts(_TFDS_DOWNLOAD_HOSTS[dataset])
        if problem:
          raise ConnectionError(f"no network: {problem}")
        self._builder.download_and_prepare()
      # as_dataset fails if the data are absent.
      self._counts = {split: self._count(split) for split in ("train", "test")}
    except Exception as e:  # pylint: disable=broad-except
      reason = (str(e).strip().splitlines() or [""])[0][:200]
      raise DataError(
          f"No {_PRETTY_NAMES[dataset]} data: tensorflow-datasets could not "
          f"download or find it ({type(e).__name__}: {reason}). Pass "
          f"--data_dir=DIR where DIR holds {_local_description(dataset)}"
      ) from e
    self.key = ("tfds", dataset, self._builder.data_dir)

  def _count(self, split):
    count = int(self._builder.as_dataset(split=split).cardinality())
    return count if count >= 0 else (
        self._builder.info.splits[split].num_examples)

  def num_records(self, split):
    return self._counts[split]

  def records(self, split):
    dataset = self._builder.as_dataset(
        split=split, shuffle_files=False,
        read_config=self._tfds.ReadConfig(interleave_cycle_length=1))
    return dataset.map(lambda x: (x["image"], tf.cast(x["label"], tf.int32)))

  def decode(self, record):
    return record

  def numpy_chunks(self, split):
    batches = self.records(split).batch(10_000)
    for images, labels in self._tfds.as_numpy(batches):
      channels = images.shape[-1]
      yield (images.reshape(len(images), -1, channels).transpose(0, 2, 1),
             labels)


def _local_description(dataset):
  if dataset == "mnist":
    return _IDX_DESCRIPTION
  return _LAYOUTS[dataset].description


def _channel_statistics(chunks, num_images):
  """Per-channel (mean, std) in [0, 1] scale over the first `num_images`.

  Reads every chunk (so all files get checked) but counts only the first
  `num_images` images, via exact per-channel histograms.
  """
  histogram = None
  seen = 0
  for pixels, _ in chunks:
    if histogram is None:
      histogram = np.zeros([pixels.shape[1], 256], np.int64)
    pixels = pixels[:max(0, num_images - seen)]
    seen += len(pixels)
    for channel in range(len(histogram)):
      histogram[channel] += np.bincount(pixels[:, channel].ravel(),
                                        minlength=256)
  values = np.arange(256) / 255.0
  count = histogram.sum(axis=1)
  mean = histogram @ values / count
  variance = histogram @ values**2 / count - mean**2
  return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


def global_contrast_normalize(images: np.ndarray) -> np.ndarray:
  """Per image: subtract its mean, divide by its std (ddof 1), in float64.

  `images` is [n, d]. As the paper runs' preprocessing (`normalize` in
  dnn/preprocess_cifar10.py): no scale or bias term; a constant image
  (std below 1e-8) is only centred.
  """
  images = np.asarray(images, np.float64)
  centred = images - images.mean(axis=1, keepdims=True)
  std = centred.std(axis=1, ddof=1, keepdims=True)
  return centred / np.where(std < 1e-8, 1.0, std)


def fit_zca(images: np.ndarray, bias: float = ZCA_BIAS):
  """ZCA whitening of [n, d] `images`: (mean [d], matrix [d, d]), float64.

  With C = cov(images) = V diag(lambda) V^T (ddof 1), the matrix is
  W = V diag(1 / (sqrt(lambda) + bias)) V^T, so (x - mean) W has covariance
  close to I over the fitted images and stays nearest to x among whitening
  maps (Bell & Sejnowski 1997; Krizhevsky 2009, App. A).
  """
  images = np.asarray(images, np.float64)
  num_images, dim = images.shape
  mean = images.mean(axis=0)
  centred = images - mean
  if num_images > dim:
    covariance = centred.T @ centred / (num_images - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    scale = 1.0 / (np.sqrt(np.maximum(eigenvalues, 0.0)) + bias)
    return mean, (eigenvectors * scale) @ eigenvectors.T
  # Fewer images than dimensions: C's non-zero eigenpairs come from the
  # small Gram matrix G = Y Y^T (G u = lambda u gives v = Y^T u / sqrt(
  # lambda)), and every other direction has lambda = 0, so scale 1 / bias
  # exactly (eigh of C would give it round-off eigenvalues instead).
  gram = centred @ centred.T / (num_images - 1)
  eigenvalues, u = np.linalg.eigh(gram)
  keep = eigenvalues > eigenvalues.max() * num_images * np.finfo(float).eps
  eigenvalues = eigenvalues[keep]
  eigenvectors = centred.T @ u[:, keep] / np.sqrt(eigenvalues *
                                                  (num_images - 1))
  scale = 1.0 / (np.sqrt(eigenvalues) + bias) - 1.0 / bias
  return mean, (eigenvectors * scale) @ eigenvectors.T + np.eye(dim) / bias


def _zca_statistics(chunks, num_images):
  """GCN + ZCA fitted on the first `num_images` (HWC-flattened) images."""
  rows, seen = [], 0
  for pixels, _ in chunks:  # [n, channels, pixels] uint8.
    take = pixels[:max(0, num_images - seen)]
    seen += len(take)
    rows.append(take.transpose(0, 2, 1).reshape(len(take), -1))
  mean, matrix = fit_zca(global_contrast_normalize(np.concatenate(rows)))
  return mean.astype(np.float32), matrix.astype(np.float32)


# ----------------------------------------------------------------- Pipeline.


class ImageData:
  """Training and evaluation `tf.data` pipelines for one `PipelineConfig`."""

  def __init__(self, config: PipelineConfig,
               statistics_cache: Optional[Dict] = None):
    """Locates and checks the data and computes the normalisation.

    Args:
      config: what to read and how to feed it.
      statistics_cache: a dict (source key, dataset, validation_examples,
        preprocess) -> (mean, std), or for gcn_zca (ZCA mean, ZCA matrix),
        that this fills and reuses: pipelines sharing one fit (and check)
        the same data once. None: fitted for this pipeline alone.

    Raises:
      DataError: the data are missing, unreadable or corrupt.
    """
    self.config = config
    self.image_shape = image_shape(config.dataset)
    if config.data_dir is None:
      self._source = _TfdsSource(config.dataset, config.tfds_data_dir,
                                 config.download)
    elif config.dataset == "mnist":
      self._source = _IdxSource(config.data_dir)
    else:
      self._source = _BinarySource(config.dataset, config.data_dir)
    total = self._source.num_records("train")
    if config.validation_examples >= total:
      raise ValueError(f"validation_examples={config.validation_examples} "
                       f"leaves no training data (of {total} images).")
    self._num_train = total - config.validation_examples
    key = (self._source.key, config.dataset, config.validation_examples,
           config.preprocess)
    statistics = {} if statistics_cache is None else statistics_cache
    if key not in statistics:
      fit = (_zca_statistics if config.preprocess == "gcn_zca"
             else _channel_statistics)
      statistics[key] = fit(self._source.numpy_chunks("train"),
                            self._num_train)
      for _ in self._source.numpy_chunks("test"):  # Just check the files.
        pass
      if config.preprocess == "gcn_zca":
        logging.info("%s: GCN + ZCA whitening fitted on the %d training "
                     "images", config.dataset, self._num_train)
      else:
        logging.info("%s training images: mean %s, std %s", config.dataset,
                     *statistics[key])
    self.mean, self.std = statistics[key]  # gcn_zca: ZCA mean and matrix.

  def num_examples(self, split: str) -> int:
    """Number of images in "train", "validation" or "test"."""
    return {"train": self._num_train,
            "validation": self.config.validation_examples,
            "test": self._source.num_records("test")}[split]

  def padded_eval_batches(self, split: str) -> int:
    """Global batches in one padded pass over `split` (`eval_dataset(pad)`)."""
    global_batch_size = self.config.eval_batch_size or self.config.batch_size
    return -(-self.num_examples(split) // global_batch_size)

  @property
  def steps_per_epoch(self) -> int:
    """Training batches per epoch, at the global batch size."""
    return self._num_train // self.config.batch_size

  def normalise(self, images: tf.Tensor) -> tf.Tensor:
    """[0, 1]-scaled images -> the network's input (see `preprocess`)."""
    if self.config.preprocess == "standardize":
      return (images - self.mean) / self.std
    shape = tf.shape(images)
    flat = tf.reshape(images, [shape[0], -1])
    flat = flat - tf.reduce_mean(flat, axis=1, keepdims=True)
    count = tf.cast(tf.shape(flat)[1], tf.float32)
    std = tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1, keepdims=True) /
                  (count - 1))
    flat = flat / tf.where(std < 1e-8, tf.ones_like(std), std)
    return tf.reshape(tf.matmul(flat - self.mean, self.std), shape)

  def train_dataset(
      self, input_context: Optional[tf.distribute.InputContext] = None,
      first_batch: int = 0) -> tf.data.Dataset:
    """Infinite, shuffled, augmented `(images, labels)` training batches.

    Batches hold config.batch_size examples, or with `input_context` the
    per-replica share of them from this pipeline's shard of the examples.
    `first_batch` resumes the stream after that many global batches (gradient
    evaluations): the result equals the stream from 0 with the batches this
    pipeline fed its replicas for them dropped, i.e. first_batch times
    (per-replica batch x replicas per pipeline) records, skipped raw, before
    decoding. (A pipeline feeds each of its replicas one batch per global
    batch, so skipping only first_batch per-replica batches would replay
    data after a resume with several replicas.)
    """
    config = self.config
    batch_size = _local_batch_size(config.batch_size, input_context)
    records_per_global_batch = batch_size * _replicas_per_pipeline(
        input_context)
    examples, count = _shard(self._examples("train"), self._num_train,
                             input_context)
    if count < batch_size:
      raise ValueError(f"{count} training images per input pipeline are "
                       f"fewer than a batch of {batch_size}.")
    dataset = examples.shuffle(min(config.shuffle_buffer, count),
                               seed=config.seed, reshuffle_each_iteration=True)
    dataset = dataset.repeat().enumerate().skip(
        first_batch * records_per_global_batch)

    augment = config.augment != "none"

    def prepare(position, example):
      index, record = example
      image, label = self._source.decode(record)
      if not augment:
        return image, label
      epoch = position // count
      return image, label, self._random_transform(_TRAINING_STREAM, epoch,
                                                  index)

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.map(self._finish, num_parallel_calls=tf.data.AUTOTUNE)
    return _with_options(dataset.prefetch(tf.data.AUTOTUNE))

  def recalibration_dataset(
      self, epoch: int,
      input_context: Optional[tf.distribute.InputContext] = None,
      augment: bool = False,
  ) -> tf.data.Dataset:
    """Endless training batches for recomputing BatchNorm statistics.

    Shuffled anew per `epoch`; does not touch the training stream. With
    `augment`, each image passes through `config.augment` as in training,
    with its own random draws (keyed by epoch and image, apart from the
    training stream's); without, the images are un-augmented. With
    `input_context`, per-replica batches from this pipeline's shard.
    """
    config = self.config
    augment = augment and config.augment != "none"
    examples, count = _shard(self._examples("train"), self._num_train,
                             input_context)
    dataset = examples.shuffle(
        min(config.shuffle_buffer, count),
        seed=config.seed * 1_000_003 + epoch, reshuffle_each_iteration=False)

    def prepare(index, record):
      image, label = self._source.decode(record)
      if not augment:
        return image, label
      return image, label, self._random_transform(_RECALIBRATION_STREAM,
                                                  epoch, index)

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.repeat().batch(
        _local_batch_size(config.batch_size, input_context),
        drop_remainder=True)
    dataset = dataset.map(self._finish, num_parallel_calls=tf.data.AUTOTUNE)
    return _with_options(dataset.prefetch(tf.data.AUTOTUNE))

  def _finish(self, images, labels, transforms=None):
    """A batch of uint8 images (and their transforms) -> network input."""
    images = tf.cast(images, tf.float32) / 255.0
    if transforms is not None:
      images = tf.raw_ops.ImageProjectiveTransformV3(
          images=images, transforms=transforms,
          output_shape=self.image_shape[:2], fill_value=0.0,
          interpolation="BILINEAR" if "rotate" in self.config.augment
          else "NEAREST", fill_mode="CONSTANT")
    return self.normalise(images), labels

  def eval_dataset(
      self, split: str = "test",
      input_context: Optional[tf.distribute.InputContext] = None,
      pad: bool = False,
  ) -> tf.data.Dataset:
    """One pass over "test" or "validation" in order; last batch may be short.

    Batches hold config.eval_batch_size (default batch_size) examples, or
    with `input_context` the per-replica share, from this pipeline's shard.

    With `pad`, elements are `(images, labels, mask)` and every batch is
    full: the pass is padded with zero images of label 0 and mask 0.0 (real
    examples have mask 1.0) up to ceil(examples / global eval batch) global
    batches, so every pipeline yields the same number of batches, all of one
    static shape (as TPUs need). Weight sums by the mask to ignore padding.
    """
    if split not in ("test", "validation"):
      raise ValueError(f"Unknown eval split {split!r}.")
    if not self.num_examples(split):
      raise ValueError(f"The {split} split is empty; set "
                       "validation_examples > 0.")
    batch_size = _local_batch_size(
        self.config.eval_batch_size or self.config.batch_size, input_context)
    examples, count = _shard(self._examples(split), self.num_examples(split),
                             input_context)
    dataset = examples.map(lambda index, record: self._source.decode(record),
                           num_parallel_calls=tf.data.AUTOTUNE)
    if pad:
      padded_count = (self.padded_eval_batches(split) * batch_size *
                      _replicas_per_pipeline(input_context))
      dataset = dataset.map(lambda image, label: (image, label, 1.0))
      image_spec, label_spec, _ = dataset.element_spec
      padding = tf.data.Dataset.from_tensors(
          (tf.zeros(image_spec.shape, image_spec.dtype),
           tf.zeros([], label_spec.dtype), 0.0))
      dataset = dataset.concatenate(padding.repeat(padded_count - count))
    dataset = dataset.batch(batch_size, drop_remainder=pad).map(
        lambda images, labels, *mask: (  # pylint: disable=g-long-lambda
            self.normalise(tf.cast(images, tf.float32) / 255.0), labels,
            *mask),
        num_parallel_calls=tf.data.AUTOTUNE)
    return _with_options(dataset.prefetch(tf.data.AUTOTUNE))

  def _examples(self, split):
    """(index within its file split, raw record) pairs of `split`."""
    if split == "test":
      return self._source.records("test").enumerate()
    examples = self._source.records("train").enumerate()
    if split == "train":
      return examples.take(self._num_train)
    return examples.skip(self._num_train)

  def _random_transform(self, stream, epoch, index):
    """Flat [8] projective transform of one augmentation, output -> input.

    Keyed by (seed, stream, epoch, index): each stream draws its own.

    Input point = D R (p + t - c) + c for output point p: t the crop shift,
    R a rotation about the centre c, D = diag(+-1, 1) the flip.
    """
    config = self.config
    key = tf.constant([config.seed, stream], tf.int64)
    for data in (epoch, index):
      key = tf.random.experimental.stateless_fold_in(key, data, alg="philox")
    uniform = tf.random.stateless_uniform([4], seed=key, alg="philox")
    flip = tf.where(uniform[0] < 0.5, -1.0, 1.0)
    angle = 0.0
    if "rotate" in config.augment:
      angle = (2.0 * uniform[1] - 1.0) * math.radians(config.rotation_degrees)
    shift = tf.zeros([2])
    if "crop" in config.augment:
      shift = tf.floor(uniform[2:] * (2 * CROP_PADDING + 1)) - CROP_PADDING
    cos, sin = tf.cos(angle), tf.sin(angle)
    height, width = self.image_shape[:2]
    centre_x, centre_y = (width - 1) / 2.0, (height - 1) / 2.0
    dx, dy = shift[0] - centre_x, shift[1] - centre_y
    return tf.stack([flip * cos, -flip * sin,
                     flip * (cos * dx - sin * dy) + centre_x,
                     sin, cos, sin * dx + cos * dy + centre_y, 0.0, 0.0])


def _local_batch_size(global_batch_size, input_context):
  if input_context is None:
    return global_batch_size
  return input_context.get_per_replica_batch_size(global_batch_size)


def _replicas_per_pipeline(input_context):
  """Replicas one input pipeline feeds, one batch each per global batch."""
  if input_context is None:
    return 1
  return (input_context.num_replicas_in_sync //
          input_context.num_input_pipelines)


def _shard(dataset, count, input_context):
  """This pipeline's share of `dataset` and its size."""
  if input_context is None or input_context.num_input_pipelines == 1:
    return dataset, count
  shards, shard = (input_context.num_input_pipelines,
                   input_context.input_pipeline_id)
  return dataset.shard(shards, shard), len(range(shard, count, shards))


def _with_options(dataset):
  options = tf.data.Options()
  options.deterministic = True
  # We shard by example ourselves; strategies that shard a dataset
  # further must do so by example too (per file would break the hold-out).
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return dataset.with_options(options)


CifarData = ImageData  # The name before MNIST joined.
